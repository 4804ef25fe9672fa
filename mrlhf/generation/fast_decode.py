"""Lean decode step: one new token per sequence through this stage's megatron layers, reading their weights directly.

A decode step moves [1, b, h] through every layer; at that size a step is dominated by per-module Python overhead
(megatron's autograd-function linears, bias-dropout-add closures, split helpers), not by arithmetic. This path does
the same math as megatron's local TransformerLayer -- same matmul/add order, so results agree bit for bit with
the module path in fp32 -- with plain tensor ops, and sends attention to the fused KV-cache ops. With ``fused``
the matmuls go to ``mrlhf::decode_linear`` as well (on the CPU, several times BLAS for 1-16 rows: see
``benchmarks/generation.py --parts k``), with GPT-2's GELU and, at TP = 1, the bias-residual adds in its epilogue;
that agrees with megatron to fp32 rounding rather than bit for bit.

It applies only to layers built from the local spec (the one ``mrlhf.models.spec`` picks without Transformer
Engine) with no dropout, MoE or sequence parallelism; :func:`supports` says so and the engine falls back otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP

from mrlhf.activations import gelu_tanh
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


class _Layer(NamedTuple):
    """One layer's modules and weights, looked up once per generation (attribute chains through torch.nn.Module
    cost more than the arithmetic of a decode step at small batch)."""

    input_norm: torch.nn.Module
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    proj: tuple[torch.Tensor, torch.Tensor | None]
    mlp_norm: torch.nn.Module
    fc1: tuple[torch.Tensor, torch.Tensor | None]
    fc2: tuple[torch.Tensor, torch.Tensor | None]
    activation: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    gelu_tanh: bool  # the activation is GPT-2's GELU, which decode_linear can apply in its epilogue
    heads: int  # query heads on this TP rank
    groups: int  # kv heads on this TP rank
    head_dim: int
    layer_number: int
    softmax_scale: float


class DecodePlan(NamedTuple):
    layers: list[_Layer]
    tp: int
    final_norm: torch.nn.Module | None
    # first stage at TP = 1: (word embedding weight, learned position embedding weight or None); else None and
    # the model's embedding module runs (vocab-parallel lookups need their all-reduce)
    embedding: tuple[torch.Tensor, torch.Tensor | None] | None


def embed(gpt, plan: DecodePlan, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens/positions [b, 1] -> [1, b, h]: megatron's LanguageModelEmbedding at inference (word + position
    lookups, then [s, b, h]), as two gathers and an add when the plan allows it."""
    if plan.embedding is None:
        return gpt.embedding(input_ids=tokens, position_ids=positions)
    words, pos = plan.embedding
    out = torch.nn.functional.embedding(tokens, words)
    if pos is not None:
        out = out + torch.nn.functional.embedding(positions, pos)
    return out.transpose(0, 1).contiguous()


def decode_plan(gpt) -> DecodePlan:
    """The lean path's view of this stage's layers (parameters are referenced, not copied: updates in place, as the
    optimizer and offload make them, are seen)."""
    tp = ps.get_tensor_model_parallel_world_size()
    layers = []
    for layer in gpt.decoder.layers:
        attn, mlp, cfg = layer.self_attention, layer.mlp, layer.config
        layers.append(
            _Layer(
                layer.input_layernorm, (attn.linear_qkv.weight, attn.linear_qkv.bias),
                (attn.linear_proj.weight, attn.linear_proj.bias), layer.pre_mlp_layernorm,
                (mlp.linear_fc1.weight, mlp.linear_fc1.bias), (mlp.linear_fc2.weight, mlp.linear_fc2.bias),
                cfg.activation_func, bool(cfg.gated_linear_unit), cfg.activation_func is gelu_tanh,
                cfg.num_attention_heads // tp,
                cfg.num_query_groups // tp, cfg.kv_channels, layer.layer_number, attn.core_attention.softmax_scale,
            )  # fmt: skip
        )
    final = gpt.decoder.final_layernorm if gpt.decoder.post_process else None
    embedding = None
    emb = getattr(gpt, "embedding", None) if gpt.pre_process else None
    if emb is not None and tp == 1 and emb.tokentype_embeddings is None and not gpt.config.fp32_residual_connection:
        pos = emb.position_embeddings.weight if emb.add_position_embedding else None
        embedding = (emb.word_embeddings.weight, pos)
    return DecodePlan(layers, tp, final, embedding)


def _column(wb: tuple[torch.Tensor, torch.Tensor | None], x: torch.Tensor, fused: bool) -> torch.Tensor:
    """ColumnParallelLinear without gather: matmul, then bias (megatron's order)."""
    weight, bias = wb
    if fused:
        return decode_linear(x, weight, bias)
    out = torch.matmul(x, weight.t())
    return out if bias is None else out + bias


def _row(wb: tuple[torch.Tensor, torch.Tensor | None], x: torch.Tensor, fused: bool):
    """RowParallelLinear: partial matmul, all-reduce over TP; bias returned for the bias-dropout-add."""
    weight, bias = wb
    out = decode_linear(x, weight) if fused else torch.matmul(x, weight.t())
    comm.all_reduce_tp(out)
    return out, bias


def _residual(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """megatron's bias-dropout-add at inference: residual + (x + bias)."""
    if bias is not None:
        x = x + bias
    return residual + x


@torch.no_grad()
def decode_layers(
    gpt, hidden: torch.Tensor, state: DecodeState, fused: bool = False, plan: DecodePlan | None = None
) -> torch.Tensor:
    """hidden [1, b, h] -> this stage's output [1, b, h] (final norm applied on the last stage). ``fused`` sends the
    matmuls to ``kv_ops.decode_linear`` (fp32-rounding agreement with megatron instead of bit identity). ``plan``
    is :func:`decode_plan` of ``gpt``, built once per generation by the caller (built here when absent)."""
    plan = decode_plan(gpt) if plan is None else plan
    b = hidden.shape[1]
    # With the kernel and no all-reduce between a row-parallel matmul and its residual add (TP = 1), the bias and
    # residual adds run in decode_linear's epilogue (same fp32 operations in the same order: residual + (xW + b));
    # so does GPT-2's GELU after the first MLP matmul.
    fuse_residual = fused and plan.tp == 1
    for layer in plan.layers:
        d, per = layer.head_dim, layer.heads // layer.groups
        x = layer.input_norm(hidden)
        mixed = _column(layer.qkv, x, fused).view(1, b, layer.groups, (per + 2) * d)
        q, k, v = torch.split(mixed, [per * d, d, d], dim=3)
        q = q.reshape(1, b, layer.heads, d)
        ctx = cached_attention(state, layer.layer_number, q, k, v, layer.softmax_scale)
        if fuse_residual:
            hidden = decode_linear(ctx, *layer.proj, residual=hidden)
        else:
            out, bias = _row(layer.proj, ctx, fused)
            hidden = _residual(out, bias, hidden)
        x = layer.mlp_norm(hidden)
        if fused and layer.gelu_tanh and not layer.gated:
            inter = decode_linear(x, *layer.fc1, activation="gelu_tanh")
        else:
            inter = _column(layer.fc1, x, fused)
            if layer.gated:
                a, g = torch.chunk(inter, 2, dim=-1)
                inter = layer.activation(a) * g
            else:
                inter = layer.activation(inter)
        if fuse_residual:
            hidden = decode_linear(inter, *layer.fc2, residual=hidden)
        else:
            out, bias = _row(layer.fc2, inter, fused)
            hidden = _residual(out, bias, hidden)
    if plan.final_norm is not None:
        hidden = plan.final_norm(hidden)
    return hidden
