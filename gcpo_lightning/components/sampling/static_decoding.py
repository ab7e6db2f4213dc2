"""Decoding with fixed shapes: a static KV cache and a one-token step that ``torch.compile`` can capture.

The prompt is prefilled as in :func:`~gcpo_lightning.components.sampling.decoding.decode` (a ``DynamicCache``,
the same numbers), copied into a ``transformers.StaticCache`` of ``rows x length`` slots, then every decode step
has the same shapes: tokens ``[R]``, positions ``[R, 1]``, the attention mask ``[R, S]`` (constant for the whole
call: the prompt's padding, then ones, the causal mask hiding the slots not written yet) and the cache
``[R, heads, S, head_dim]`` per layer, written in place at a slot counter that is a tensor. With
``torch.compile(mode="reduce-overhead")`` the step (forward, EOS suppression, sampling, the finished flags) is
captured once as a CUDA graph and replayed.

Legend: ``n`` rows of this call, ``R >= n`` rows of the cache (rows ``n..R-1`` are padding, finished from the
start), ``P`` prompt length, ``S >= P + T`` cache slots, ``T`` new tokens, ``V`` vocabulary.

The trade-offs of fixed shapes: finished rows are not dropped (:func:`decode_loop`'s ``compact`` would change the
batch), every step attends over all ``S`` slots (masked), and a call with fewer rows than the cache pads them.
The tokens are those of :func:`decode_loop`: each step draws one uniform number per row of the call, outside the
compiled step, so a seeded stream is the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcpo_lightning.components.sampling.decoding import next_tokens, prefill

if TYPE_CHECKING:
    from gcpo_lightning.components.sampling.backends import Decoding

Step = Callable[..., tuple[Tensor, Tensor]]


def pick_tokens(
    logits: Tensor, uniform: Tensor | None, done: Tensor, suppress_eos: bool, eos: Tensor, d: Decoding
) -> tuple[Tensor, Tensor]:
    """The next token of every row and the updated finished flags, as one step of :func:`decode_loop` picks them.

    ``logits`` ``[R, V]``, ``uniform`` ``[R]`` draws (``None`` when greedy), ``done`` ``[R]``, ``eos`` ``[e]``;
    EOS is masked out when ``suppress_eos`` (before ``min_new_tokens``), finished rows get ``pad_id``.
    Returns ``([R] tokens, [R] done)``.
    """
    if suppress_eos:
        logits = logits.index_fill(-1, eos, float("-inf"))
    nxt = next_tokens(logits, d.temperature, d.top_p, d.top_k, d.greedy, uniform).masked_fill(done, d.pad_id)  # [R]
    return nxt, done | torch.isin(nxt, eos)


def decode_step(
    model: nn.Module,
    cache,
    tokens: Tensor,
    positions: Tensor,
    mask: Tensor,
    uniform: Tensor | None,
    done: Tensor,
    suppress_eos: bool,
    eos: Tensor,
    d: Decoding,
) -> tuple[Tensor, Tensor]:
    """One fixed-shape step: feed ``tokens`` ``[R]`` at ``positions`` ``[R, 1]`` into the static ``cache`` (mask
    ``[R, S]``) and pick the next tokens (:func:`pick_tokens`). What ``torch.compile`` captures."""
    out = model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return pick_tokens(out.logits[:, -1], uniform, done, suppress_eos, eos, d)  # [R], [R]


@dataclass
class StaticBuffers:
    """A ``StaticCache`` of ``rows x length`` slots for one model, and the (compiled or plain) step that writes it."""

    model: weakref.ref  # the model the cache and step belong to
    cache: Any  # transformers.StaticCache
    rows: int  # R
    length: int  # S
    step: Step

    def fits(self, model: nn.Module, prefilled, rows: int, length: int) -> bool:
        """Whether a call of ``rows`` rows needing ``length`` slots, prefilled in ``prefilled`` (a ``DynamicCache``),
        can use these buffers (same model, dtype and device)."""
        mine, theirs = self.cache.layers[0].keys, prefilled.layers[0].keys
        same = mine.dtype == theirs.dtype and mine.device == theirs.device
        return self.model() is model and same and rows <= self.rows and length <= self.length

    def load(self, prefilled, n: int, P: int) -> None:
        """Copy a filled ``DynamicCache`` (per layer ``[n, heads, P, head_dim]``) into rows ``:n``, slots ``:P``,
        and set the slot counter to ``P``."""
        for layer, filled in zip(self.cache.layers, prefilled.layers):
            layer.keys[:n, :, :P] = filled.keys
            layer.values[:n, :, :P] = filled.values
            layer.cumulative_length.fill_(P)


BuffersFor = Callable[[nn.Module, Any, int, int], StaticBuffers]
"""``(model, prefilled DynamicCache, rows, slots needed) -> StaticBuffers``: the backend's buffers, reused or grown."""


def allocate_buffers(model: nn.Module, prefilled, rows: int, length: int, step: Step) -> StaticBuffers:
    """A ``transformers.StaticCache`` of ``rows x length`` with the heads, head size, dtype and device of the
    layers of ``prefilled`` (a filled ``DynamicCache``), its tensors allocated now (outside any compiled region,
    so that their addresses are marked static for CUDA graphs)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache: Any = StaticCache(config=model.config, max_cache_len=length)  # type: ignore[arg-type]
    if len(cache.layers) != len(prefilled.layers) or any(type(layer) is not StaticLayer for layer in cache.layers):
        raise ValueError(
            "StaticCacheLoop supports models whose layers all use full attention (no sliding window, no linear "
            "attention); use KVCacheLoop"
        )
    for layer, filled in zip(cache.layers, prefilled.layers):
        k, v = filled.keys, filled.values  # [n, heads, P, head_dim]
        layer.lazy_initialization(k.new_empty(rows, *k.shape[1:]), v.new_empty(rows, *v.shape[1:]))
    return StaticBuffers(weakref.ref(model), cache, rows, length, step)


def static_mask(mask: Tensor, rows: int, length: int) -> Tensor:
    """The attention mask of the whole call: each row's prompt mask ``[n, P]``, then ones up to ``length`` slots;
    the padding rows ``n..rows-1`` see only their own new slots.  ``[rows, length]``."""
    n, P = mask.shape
    full = mask.new_ones(rows, length)  # [R, S]
    full[:, :P] = 0
    full[:n, :P] = mask
    return full


def draw(n: int, rows: int, greedy: bool, device: torch.device) -> Tensor | None:
    """One uniform number per row of the call (as :func:`decode_loop` draws them), zero for the padding rows."""
    return None if greedy else F.pad(torch.rand(n, device=device), (0, rows - n))  # [R]


@torch.no_grad()
def static_decode_loop(
    model: nn.Module, logits: Tensor, mask: Tensor, last_position: Tensor, d: Decoding, buffers: StaticBuffers
) -> Tensor:
    """:func:`decode_loop` on static buffers holding the prompts' KV cache (:meth:`StaticBuffers.load`):
    ``logits`` ``[n, V]`` predict the first new token, ``mask`` ``[n, P]``, ``last_position`` ``[n, 1]``.

    Returns ``[n, T]`` completion tokens (``T <= max_new_tokens``), ``pad_id`` after a row's EOS; the same tokens
    as :func:`decode_loop` for the same random state.
    """
    n, R, device = mask.shape[0], buffers.rows, mask.device
    full_mask = static_mask(mask, R, buffers.length)  # [R, S]
    positions = F.pad(last_position, (0, 0, 0, R - n))  # [R, 1]
    done = torch.arange(R, device=device) >= n  # [R] padding rows are finished from the start
    eos = torch.tensor(d.eos_ids, device=device)
    out = torch.full((n, d.max_new_tokens), d.pad_id, dtype=torch.long, device=device)  # [n, T]
    nxt = torch.full((R,), d.pad_id, dtype=torch.long, device=device)  # [R]
    steps = 0
    for t in range(d.max_new_tokens):
        uniform = draw(n, R, d.greedy, device)  # [R]
        if t == 0:
            first = F.pad(logits, (0, 0, 0, R - n))  # [R, V]
            nxt, done = pick_tokens(first, uniform, done, t < d.min_new_tokens, eos, d)
        else:
            positions = positions + 1  # [R, 1]
            torch.compiler.cudagraph_mark_step_begin()  # a new replay may overwrite the last one's outputs
            nxt, done = buffers.step(
                model, buffers.cache, nxt, positions, full_mask, uniform, done, t < d.min_new_tokens, eos, d
            )
            nxt, done = nxt.clone(), done.clone()  # out of the CUDA graph's memory pool before the next replay
        out[:, t] = nxt[:n]
        steps = t + 1
        if bool(done.all()):
            break
    return out[:, :steps]  # [n, T]


def loaded(model: nn.Module, prefilled, mask: Tensor, d: Decoding, buffers_for: BuffersFor) -> StaticBuffers:
    """The backend's buffers for ``mask.shape[0]`` rows and ``P + max_new_tokens`` slots, holding ``prefilled``
    (a filled ``DynamicCache`` of ``P`` slots; the caller may drop it once this returns)."""
    n, P = mask.shape
    buffers = buffers_for(model, prefilled, n, P + d.max_new_tokens)
    buffers.load(prefilled, n, P)
    return buffers


@torch.no_grad()
def static_decode(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, d: Decoding, buffers_for: BuffersFor
) -> Tensor:
    """Generate after left-padded prompts ``[n, P]`` on static buffers (``buffers_for(model, prefilled, rows,
    length)`` provides them).  Returns ``[n, T]`` tokens, as :func:`~.decoding.decode`."""
    logits, cache, last_position = prefill(model, prompt_ids, prompt_mask)
    buffers = loaded(model, cache, prompt_mask, d, buffers_for)
    del cache  # the static buffers hold it now
    return static_decode_loop(model, logits, prompt_mask, last_position, d, buffers)
