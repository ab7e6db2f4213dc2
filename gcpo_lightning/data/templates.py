"""Prompt templates of the shipped data modules (the paper's q)."""

from __future__ import annotations

PROMPT_TEMPLATE = "Problem: {question}\nSolution:"
"""How a single question is asked (the paper's q)."""


BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{{}}."
"""The usual instruction for math reasoning models (DeepSeek-R1's evaluation prompt); ``{{}}`` is ``str.format``."""


MATH_TEMPLATE = "{question}\n" + BOXED_INSTRUCTION
"""How GSM8K and MATH questions are asked."""


HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Reply with the complete function, signature included, "
    "in a single ```python code block.\n\n```python\n{question}```"
)
"""How a HumanEval code prompt (signature + docstring) is asked."""
