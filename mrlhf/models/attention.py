"""Core attention for training and prefill: torch SDPA with GQA and padding masks, on CPU and GPU.

Drop-in for megatron-core's ``core_attention`` submodule (same constructor and forward signature). The mask
follows megatron's convention: a bool tensor ``[b, 1, sq, sk]`` where True means "do not attend"; None means
causal attention aligned to the end of the keys (so ``sq < sk`` works for decoding over a cache).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from mrlhf.ops.kv_cache import active_decode_state, cached_attention
from mrlhf.parallel.random import model_parallel_rng


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v over local heads; GQA without materialising repeated keys."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        assert packed_seq_params is None and attention_bias is None, "packed sequences / bias not supported here"
        state = active_decode_state()
        if state is not None:  # generation over the KV cache (see mrlhf.ops.kv_cache)
            out = cached_attention(state, self.layer_number, query, key, value, self.softmax_scale)
            if out is not None:
                return out  # decode step; prefill appended its keys and runs ordinary attention below
        sq, b, np_, hn = query.shape
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        gqa = k.shape[1] != q.shape[1]
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0:  # heads differ between TP ranks: their dropout masks come from the TP-region stream
            with model_parallel_rng(q.device):
                out = self._attend(q, k, v, attention_mask, sq, dropout, gqa)
        else:
            out = self._attend(q, k, v, attention_mask, sq, dropout, gqa)
        # [b, n, sq, hn] -> [sq, b, n*hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _attend(self, q, k, v, attention_mask, sq: int, dropout: float, gqa: bool) -> torch.Tensor:
        if attention_mask is None:
            sk = k.shape[2]
            if sq == sk:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa
                )
            else:
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa
            )
        return out


def build_attention_mask(attention_mask: torch.Tensor | None, sq: int) -> torch.Tensor | None:
    """Padding mask ``[b, s]`` (True = real token) -> megatron mask ``[b, 1, s, s]`` (True = masked).

    A 4-D mask (packed samples, built by ``collate_packed_sft``) passes through unchanged.

    Causal and key-padding are combined. A padded query row would have nothing to attend to, so it attends to
    itself: its output is ignored by every loss, and this keeps softmax free of NaNs. None stays None (causal).
    """
    if attention_mask is not None and attention_mask.dim() == 4:  # already [b, 1, sq, sk] (packed sequences)
        return attention_mask
    if attention_mask is None or bool(attention_mask.all()):
        return None
    b, s = attention_mask.shape
    assert s == sq
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask[:, None, :]  # [b, sq, sk]
    allowed |= torch.eye(s, dtype=torch.bool, device=attention_mask.device)[None]
    return (~allowed)[:, None]
