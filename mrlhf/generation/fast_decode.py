"""Lean decode step: one new token per sequence through this stage's megatron layers, reading their weights directly.

A decode step moves [1, b, h] through every layer; at that size a step is dominated by per-module Python overhead
(megatron's autograd-function linears, bias-dropout-add closures, split helpers), not by arithmetic. This path does
the same math as megatron's local TransformerLayer -- same matmul/add order, so results agree bit for bit with
the module path in fp32 -- with plain tensor ops, and sends attention to the fused KV-cache ops. With ``fused``
the matmuls go to ``mrlhf::decode_linear`` as well (on the CPU: 1.2-3.5x BLAS for 1-16 rows, see
csrc/decode_linear.cpp), which agrees with megatron to fp32 rounding rather than bit for bit.

It applies only to layers built from the local spec (the one ``mrlhf.models.spec`` picks without Transformer
Engine) with no dropout, MoE or sequence parallelism; :func:`supports` says so and the engine falls back otherwise.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP

from mrlhf.ops.kv_cache import DecodeState, cached_attention
from mrlhf.ops.kv_ops import decode_linear
from mrlhf.parallel import comm


def supports(gpt) -> bool:
    cfg = gpt.config
    if cfg.sequence_parallel or cfg.hidden_dropout or getattr(cfg, "num_moe_experts", None):
        return False
    for layer in gpt.decoder.layers:
        attn = layer.self_attention
        if not (
            isinstance(attn.linear_qkv, ColumnParallelLinear)
            and isinstance(attn.linear_proj, RowParallelLinear)
            and isinstance(layer.mlp, MLP)
            and isinstance(layer.mlp.linear_fc1, ColumnParallelLinear)
            and type(attn.q_layernorm).__name__ == "IdentityOp"
            and type(attn.k_layernorm).__name__ == "IdentityOp"
        ):
            return False
    return True


def _column(linear, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """ColumnParallelLinear without gather: matmul, then bias (megatron's order)."""
    if fused:
        return decode_linear(x, linear.weight, linear.bias)
    out = torch.matmul(x, linear.weight.t())
    return out if linear.bias is None else out + linear.bias


def _row(linear, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RowParallelLinear: partial matmul, all-reduce over TP; bias returned for the bias-dropout-add."""
    out = decode_linear(x, linear.weight) if fused else torch.matmul(x, linear.weight.t())
    comm.all_reduce_tp(out)
    return out, linear.bias


def _residual(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """megatron's bias-dropout-add at inference: residual + (x + bias)."""
    if bias is not None:
        x = x + bias
    return residual + x


@torch.no_grad()
def decode_layers(gpt, hidden: torch.Tensor, state: DecodeState, fused: bool = False) -> torch.Tensor:
    """hidden [1, b, h] -> this stage's output [1, b, h] (final norm applied on the last stage). ``fused`` sends the
    matmuls to ``kv_ops.decode_linear`` (fp32-rounding agreement with megatron instead of bit identity)."""
    tp = ps.get_tensor_model_parallel_world_size()
    for layer in gpt.decoder.layers:
        attn = layer.self_attention
        cfg = layer.config
        heads = cfg.num_attention_heads // tp
        groups = cfg.num_query_groups // tp
        d = cfg.kv_channels
        per = heads // groups
        x = layer.input_layernorm(hidden)
        mixed = _column(attn.linear_qkv, x, fused).view(1, x.shape[1], groups, (per + 2) * d)
        q, k, v = torch.split(mixed, [per * d, d, d], dim=3)
        q = q.reshape(1, x.shape[1], heads, d)
        ctx = cached_attention(state, layer.layer_number, q, k, v, attn.core_attention.softmax_scale)
        out, bias = _row(attn.linear_proj, ctx, fused)
        hidden = _residual(out, bias, hidden)
        x = layer.pre_mlp_layernorm(hidden)
        mlp = layer.mlp
        inter = _column(mlp.linear_fc1, x, fused)
        if cfg.gated_linear_unit:
            a, b = torch.chunk(inter, 2, dim=-1)
            inter = cfg.activation_func(a) * b
        else:
            inter = cfg.activation_func(inter)
        out, bias = _row(mlp.linear_fc2, inter, fused)
        hidden = _residual(out, bias, hidden)
    if gpt.decoder.post_process and gpt.decoder.final_layernorm is not None:
        hidden = gpt.decoder.final_layernorm(hidden)
    return hidden
