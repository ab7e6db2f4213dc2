"""Tasks shipped with the kit: the embedded arithmetic task, its character tokenizer, and generated word problems."""

from gcpo_lightning.tasks.arithmetic import ArithmeticTask, extract_answer, is_correct, solve
from gcpo_lightning.tasks.word_problems import WordProblem, WordProblemTask, write_word_problems

__all__ = ["ArithmeticTask", "WordProblem", "WordProblemTask", "extract_answer", "is_correct", "solve",
           "write_word_problems"]
