"""Cascade attention for contexts read as sets: each group's block KV cache is read once per group, not per row.

With ``context_layout: set`` every row of a group (its ``G*M*K`` context samples) attends to the same block
``[P | L_0 .. L_{G-1}]``, minus its own candidate's line. Copying the block into every row's KV cache makes each
decoding step read it ``G*M*K`` times, and on a CPU that memory traffic is most of the attention's time. Here the
rows' cache holds only their own tokens (tail and samples), and attention is computed in two parts merged by their
log-sum-exp: the queries of a group together against its block (one fused attention call for all groups, hidden
lines masked) and each row against its own keys. The result equals attention over the gathered cache to float
rounding (tested).

It is registered with Hugging Face as the attention implementation ``gcpo_set_cascade`` (with ``sdpa``'s mask
format) and switched on only inside :func:`cascade_attention`; every other forward pass is untouched. The block part
uses PyTorch's CPU flash-attention kernel, which returns the log-sum-exp; on other devices the sampler gathers the
block into each row's cache instead (:func:`supports_cascade`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

NAME = "gcpo_set_cascade"


@dataclass
class SharedBlocks:
    """The blocks every row attends to besides its own keys, and which of their positions each row sees."""

    keys: list[Tensor]  # per layer [b, h_kv, Lb, d]
    values: list[Tensor]  # per layer [b, h_kv, Lb, d]
    group: Tensor  # [r] the block of each row (the rows of a block are consecutive)
    visible: Tensor  # [r, Lb] bool: the block positions the row attends to
    _layout: tuple[Tensor, int, Tensor] | None = field(default=None, repr=False)

    def select(self, rows: Tensor) -> SharedBlocks:
        """The state of the batch ``rows`` (``[a]`` ascending indices)."""
        return SharedBlocks(self.keys, self.values, self.group[rows], self.visible[rows])

    def select_(self, rows: Tensor) -> None:
        """Keep only the batch ``rows``, in place (the decode loop dropping finished rows)."""
        self.group, self.visible, self._layout = self.group[rows], self.visible[rows], None

    def layout(self) -> tuple[Tensor, int, Tensor]:
        """``(slot [r], width, bias [b, width, Lb])``: each row's slot among its block's rows, the most rows of any
        block, and the additive mask of every slot (0 where visible; padding slots see everything)."""
        if self._layout is None:
            b, Lb = self.keys[0].shape[0], self.keys[0].shape[2]
            counts = torch.bincount(self.group, minlength=b)  # [b]
            slot = torch.arange(self.group.shape[0], device=self.group.device) - (counts.cumsum(0) - counts)[self.group]
            width = int(counts.max())
            visible = torch.ones(b, width, Lb, dtype=torch.bool, device=self.group.device)
            visible[self.group, slot] = self.visible
            bias = torch.zeros(visible.shape, dtype=self.keys[0].dtype, device=visible.device)
            self._layout = slot, width, bias.masked_fill(~visible, float("-inf"))
        return self._layout


ACTIVE: ContextVar[SharedBlocks | None] = ContextVar("gcpo_shared_blocks", default=None)


def block_attention(query: Tensor, shared: SharedBlocks, layer: int, scale: float) -> tuple[Tensor, Tensor]:
    """Every row's attention over its block: ``query`` ``[r, h_kv, n, d]`` (``n`` queries per kv head) to
    ``(output [r, h_kv, n, d], log-sum-exp [r, h_kv, n])``, one fused call over the blocks' padded slots."""
    r, h_kv, n, d = query.shape
    slot, width, bias = shared.layout()
    keys, values = shared.keys[layer], shared.values[layer]  # [b, h_kv, Lb, d]
    b, Lb = keys.shape[0], keys.shape[2]
    slots = query.new_zeros(b, width, h_kv, n, d)
    slots[shared.group, slot] = query  # [b, width, h_kv, n, d]
    grouped = slots.permute(0, 2, 1, 3, 4).reshape(b, h_kv, width * n, d)
    mask = bias.unsqueeze(2).expand(b, width, n, Lb).reshape(b, 1, width * n, Lb)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        grouped, keys, values, 0.0, False, attn_mask=mask, scale=scale
    )[:2]  # [b, h_kv, width*n, d], [b, h_kv, width*n]
    out = out.view(b, h_kv, width, n, d).permute(0, 2, 1, 3, 4)[shared.group, slot]  # [r, h_kv, n, d]
    lse = lse.view(b, h_kv, width, n).permute(0, 2, 1, 3)[shared.group, slot]  # [r, h_kv, n]
    return out, lse


def own_attention(
    query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, q: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Every row's attention over its own keys: ``query`` ``[r, h_kv, rep*q, d]``, ``key``/``value``
    ``[r, h_kv, L, d]``; ``attention_mask`` ``sdpa``'s ``[r, 1, q, L]`` bool or ``None`` (causal: the queries are the
    last ``q`` keys). Returns ``(output, log-sum-exp)``; rows that see no key give output 0 and log-sum-exp -inf."""
    r, h_kv, n, _ = query.shape
    L = key.shape[2]
    scores = (query.float() @ key.float().transpose(-1, -2) * scale).view(r, h_kv, n // q, q, L)
    if attention_mask is None:
        allowed = torch.ones(q, L, dtype=torch.bool, device=query.device).tril(L - q)
    else:
        allowed = attention_mask.bool()[:, :, None]  # [r, 1, 1, q, L]
    scores = scores.masked_fill(~allowed, float("-inf")).view(r, h_kv, n, L)
    lse = scores.logsumexp(-1)  # [r, h_kv, n]
    weights = (scores - lse.unsqueeze(-1)).exp().nan_to_num(0.0)  # a row that sees nothing: weights 0
    return weights @ value.float(), lse


def layer_index(module: nn.Module) -> int:
    """The decoder layer an attention module belongs to (Hugging Face sets ``layer_idx``)."""
    index = getattr(module, "layer_idx", None)
    if not isinstance(index, int):
        raise RuntimeError(f"the {NAME} attention needs the attention module's layer_idx, got {index!r}")
    return index


def set_cascade_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of ``query`` ``[r, h, q, d]`` over the active :class:`SharedBlocks` and the rows' own ``key`` /
    ``value`` ``[r, h_kv, L, d]``, merged by log-sum-exp. Returns ``([r, q, h, d], None)`` as Hugging Face's
    attention functions do."""
    shared = ACTIVE.get()
    if shared is None:
        raise RuntimeError(f"the {NAME} attention ran outside cascade_attention()")
    r, h, q, d = query.shape
    h_kv = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    grouped = query.reshape(r, h_kv, (h // h_kv) * q, d)  # a kv head's queries together
    out_block, lse_block = block_attention(grouped.to(shared.keys[0].dtype), shared, layer_index(module), scale)
    out_own, lse_own = own_attention(grouped, key, value, attention_mask, q, scale)
    weight = torch.sigmoid(lse_block.float() - lse_own).unsqueeze(-1)  # the block's share of the softmax mass
    out = weight * out_block.float() + (1 - weight) * out_own  # [r, h_kv, rep*q, d]
    # reshape, not view: the merge keeps the block output's strides, which the grouped heads (h_kv < h) leave apart
    return out.reshape(r, h, q, d).to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`set_cascade_attention` with Hugging Face (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, set_cascade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def supports_cascade(model: nn.Module) -> bool:
    """Whether ``model`` runs on CPU with Hugging Face attention that can be swapped (``sdpa`` or ``eager``)."""
    config = getattr(model, "config", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    return on_cpu and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


@contextmanager
def cascade_attention(model: nn.Module, shared: SharedBlocks) -> Iterator[None]:
    """Run ``model``'s forward passes inside the block with :func:`set_cascade_attention` over ``shared``."""
    register()
    config: Any = model.config
    before = config._attn_implementation
    token = ACTIVE.set(shared)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        ACTIVE.reset(token)
