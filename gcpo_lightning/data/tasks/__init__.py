"""Tasks shipped with the kit: the embedded arithmetic task and generated word problems."""

from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask, solve
from gcpo_lightning.data.tasks.word_problems import WordProblem, WordProblemTask, write_word_problems

__all__ = ["ArithmeticTask", "WordProblem", "WordProblemTask", "solve", "write_word_problems"]
