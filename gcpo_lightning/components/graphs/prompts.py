"""Prompt templates shared by the data module, the causal graph builders and the pre-training script.

Every template is a plain ``str.format`` string. Placeholders:

- ``{question}``: the task's question text (e.g. ``"7+5-3"``).
- ``{candidates}``: the rendered candidate list (one ``[k] solution`` line per candidate, 1-based).
- ``{others}``: like ``{candidates}`` but without the response being conditioned on.
- ``{integrated}``: one integrated (combined) solution.
"""

from __future__ import annotations

INTEGRATION_TEMPLATE = "Problem: {question}\nCandidate solutions:\n{candidates}\nCombine them into one final solution:"
"""The integration prompt from the spec: q plus all G candidates, then the collider y_n."""

CONTEXT_TEMPLATE = (
    "Problem: {question}\nOther solutions:\n{others}\nCombined solution:{integrated}\nNow write your own solution:"
)
"""The conditioning context x_{i,l}: q, the other candidates and one integrated output."""

CANDIDATE_LINE = "[{index}]{text}"
"""One line of a candidate list. ``text`` keeps its own leading space, as completions do."""


def render_candidates(texts: list[str], skip: int | None = None, template: str = CANDIDATE_LINE) -> str:
    """Render candidate completions as numbered lines, optionally leaving out candidate ``skip``.

    Numbering is 1-based and follows the original positions, so candidate 3 is always ``[3]``.
    """
    lines = [template.format(index=k + 1, text=t) for k, t in enumerate(texts) if k != skip]
    return "\n".join(lines)
