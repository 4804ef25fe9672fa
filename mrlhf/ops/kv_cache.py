"""KV cache for incremental decoding: allocated once per pipeline stage, one slot per in-flight microbatch.

Layout per stage: ``k, v: [layers_on_stage, slots, max_batch, max_len, groups_per_tp_rank, head_dim]``; the view of
one (layer, slot) is ``[B, L, G, D]`` as ``mrlhf.ops.kv_ops`` expects. Prompts are left-padded, so every sequence of
a microbatch writes its t-th token at the same column; ``starts`` (left padding) and ``lengths`` (exclusive end)
tell decode attention which columns are real.

The model's core attention finds the cache through :func:`active_decode_state` (set by the generation engine with
:func:`decoding`), so megatron's layers need no change: prefill runs ordinary attention and appends the (already
rotated) keys; decode hands unrotated q/k to the fused ops, which apply RoPE at each sequence's own position.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


class KVCache:
    """Preallocated K/V storage for this stage's layers."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_batch: int,
        max_len: int,
        groups: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = self.shape(num_layers, num_slots, max_batch, max_len, groups, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_len = max_batch, max_len
        self._views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def shape(num_layers: int, num_slots: int, max_batch: int, max_len: int, groups: int, head_dim: int):
        """One of K and V: [layers, slots, rows, positions, KV groups on this TP rank, head_dim]."""
        return (num_layers, num_slots, max_batch, max_len, groups, head_dim)

    @classmethod
    def bytes_for(cls, *shape_args: int, dtype: torch.dtype) -> int:
        """What a cache of these dimensions (the arguments of :meth:`shape`) holds: K and V."""
        return 2 * math.prod(cls.shape(*shape_args)) * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.numel() * self.k.element_size() * 2

    def view(self, layer: int, slot: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, G, D] views of one layer's cache for the first ``batch`` rows of ``slot`` (contiguous); made once
        per (layer, slot, batch) -- a decode step asks for every layer's."""
        key = (layer, slot, batch)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = (self.k[layer, slot, :batch], self.v[layer, slot, :batch])
        return views

    def free(self) -> None:
        """Release the memory (end of a rollout); the object must not be used afterwards."""
        self.k = self.v = None  # type: ignore[assignment]
        self._views.clear()


@dataclass
class DecodeState:
    """What core attention needs for one forward of one microbatch over the cache."""

    cache: KVCache
    slot: int
    batch: int
    layer_offset: int  # global index of this stage's first layer
    prefill: bool
    write_pos: torch.Tensor  # [B] column of the first new token
    starts: torch.Tensor | None = None  # [B] first real column (decode)
    lengths: torch.Tensor | None = None  # [B] exclusive end after the append (decode)
    cos: torch.Tensor | None = None  # [B, D] RoPE at each sequence's position (decode, rope models)
    sin: torch.Tensor | None = None


_state: contextvars.ContextVar[DecodeState | None] = contextvars.ContextVar("mrlhf_decode_state", default=None)


def active_decode_state() -> DecodeState | None:
    return _state.get()


@contextlib.contextmanager
def decoding(state: DecodeState) -> Iterator[None]:
    token = _state.set(state)
    try:
        yield
    finally:
        _state.reset(token)


def cached_attention(
    state: DecodeState, layer_number: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """Decode step over the cache: append k/v, attend. query [1, B, H, D], key/value [1, B, G, D] -> [1, B, H*D].

    Prefill only appends (the caller runs ordinary attention) and returns None.
    """
    from mrlhf.ops import kv_ops

    k_cache, v_cache = state.cache.view(layer_number - 1 - state.layer_offset, state.slot, state.batch)
    # [s, b, g, d] -> [b, s, g, d]
    k_new, v_new = key.transpose(0, 1).contiguous(), value.transpose(0, 1).contiguous()
    if state.prefill:
        kv_ops.kv_append(k_cache, v_cache, k_new, v_new, state.write_pos, None, None)
        return None
    cos = None if state.cos is None else state.cos[:, None].contiguous()  # [B, 1, D] for the one new token
    sin = None if state.sin is None else state.sin[:, None].contiguous()
    kv_ops.kv_append(k_cache, v_cache, k_new, v_new, state.write_pos, cos, sin)
    out = kv_ops.decode_attention(
        query[0].contiguous(), k_cache, v_cache, state.starts, state.lengths, state.cos, state.sin, scale, 0
    )  # [B, H, D]
    b, h, d = out.shape
    return out.reshape(1, b, h * d)
