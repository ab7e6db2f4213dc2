"""Tokenise GCPO's contexts as sets (``context_layout: set``): per group one block, per context a tail.

The context template is cut at ``{others}\\n``: what comes before (rendered with ``q``, after the chat template's
opening) is the header ``P``; each candidate's line is ``candidate_template`` plus ``"\\n"``; what comes after (with
``y_{n,l}``, then the chat template's closing) is the tail of ``x_{i,l}``. Read in order, header, the lines but
``L_i`` and the tail spell exactly the textual context; only the attention between them differs
(:mod:`gcpo_lightning.functional.set_attention`). The pieces are tokenised separately, each as if
text followed it (:func:`tokenize_piece`), so that a BPE tokenizer gives the whole string's tokens at the boundaries
(checked for SmolLM2 by ``benchmarks/set_tokenization.py``; a tokenizer that merged characters across a boundary
could still differ there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gcpo_lightning.functional.set_attention import PAD, SHARED
from gcpo_lightning.interfaces.containers import PolicyModels, SetContexts

OTHERS = "{others}\n"
SENTINEL = "\x00GCPO-CONTEXT\x00"


def split_context_template(template: str) -> tuple[str, str]:
    """``(header, tail)`` of a context template around ``{others}\\n``; a ``ValueError`` naming what is wrong when
    the template cannot be read as a set (no ``{others}`` followed by a newline, or ``{integrated}`` before it)."""
    if template.count(OTHERS) != 1:
        raise ValueError(
            "context_layout: set needs the context_template to contain '{others}' exactly once, followed by a "
            f"newline (the candidate lines end there): {template!r}"
        )
    head, tail = template.split(OTHERS)
    if "{integrated}" in head:
        raise ValueError(
            f"context_layout: set needs '{{integrated}}' after '{{others}}' in the context_template: {template!r}"
        )
    return head, tail


def render_parts(models: PolicyModels) -> tuple[str, str]:
    """What the model's input rendering (chat template) puts before and after a text."""
    rendered = models.render(SENTINEL)
    if rendered.count(SENTINEL) != 1:
        raise ValueError("context_layout: set needs a render (chat template) that wraps the text once, unchanged")
    before, after = rendered.split(SENTINEL)
    return before, after


FOLLOWER = "\x00"
"""Stands for the next piece's first character while a piece is tokenised (see :func:`tokenize_piece`)."""


def tokenize_piece(tokenize: Callable[[str], list[int]], piece: str) -> list[int]:
    """The tokens of ``piece`` as a tokenizer gives them when more text follows it.

    Every header and candidate line ends in a newline and is followed by a non-space character (the next line's
    ``[``, the tail); a BPE pre-tokenizer splits a run of newlines differently at the end of a string than before a
    non-space, so the piece is tokenised with :data:`FOLLOWER` after it and that character's tokens removed. A
    tokenizer that merges the follower into the piece gets the piece tokenised alone.
    """
    follower = tokenize(FOLLOWER)
    ids = tokenize(piece + FOLLOWER)
    if follower and ids[-len(follower) :] == follower:
        return ids[: -len(follower)]
    return tokenize(piece)


def build_set_contexts(
    models: PolicyModels,
    questions: list[str],
    candidates: list[str],
    integrated: list[list[str]],
    group_size: int,
    context_template: str,
    candidate_template: str,
    device: Any,
) -> SetContexts:
    """The ``N = B*G`` candidates' contexts as sets: each group's block tokens and each ``x_{i,l}``'s tail."""
    head, tail = split_context_template(context_template)
    before, after = render_parts(models)
    tokenize = lambda text: models.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    G = group_size
    blocks, lines, tails = [], [], []
    for b, q in enumerate(questions):
        ids = tokenize_piece(tokenize, before + head.format(question=q))
        code = [SHARED] * len(ids)
        for k, text in enumerate(candidates[b * G : (b + 1) * G]):
            piece = tokenize_piece(tokenize, candidate_template.format(index=k + 1, text=text) + "\n")
            ids += piece
            code += [k] * len(piece)
        blocks.append(ids)
        lines.append(code)
        tails.append([tokenize(tail.format(question=q, integrated=y_n) + after) for y_n in integrated[b]])
    Lb = max(len(x) for x in blocks)
    Lt = max(len(t) for per_b in tails for t in per_b)
    block_ids = torch.tensor([x + [0] * (Lb - len(x)) for x in blocks], dtype=torch.long)  # [B, Lb]
    block_line = torch.tensor([x + [PAD] * (Lb - len(x)) for x in lines], dtype=torch.long)  # [B, Lb]
    tail_ids = torch.tensor([[t + [0] * (Lt - len(t)) for t in per_b] for per_b in tails], dtype=torch.long)
    tail_mask = torch.tensor([[[1] * len(t) + [0] * (Lt - len(t)) for t in per_b] for per_b in tails])
    group = torch.arange(len(questions)).repeat_interleave(G)  # [N]
    return SetContexts(
        block_ids=block_ids[group].to(device),  # [N, Lb]
        block_line=block_line[group].to(device),  # [N, Lb]
        own=torch.arange(G).repeat(len(questions)).to(device),  # [N]
        group=group.to(device),  # [N]
        tail_ids=tail_ids[group].to(device),  # [N, M, Lt]
        tail_mask=tail_mask[group].to(device),  # [N, M, Lt]
    )
