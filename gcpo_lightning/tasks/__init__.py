"""Tasks shipped with the kit: the embedded arithmetic task and its character tokenizer."""

from gcpo_lightning.tasks.arithmetic import ArithmeticTask, extract_answer, is_correct, solve

__all__ = ["ArithmeticTask", "extract_answer", "is_correct", "solve"]
