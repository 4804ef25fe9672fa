"""Heads: hidden states [s, b, h] of the last stage -> log-probs, values or rewards.

The LM head keeps logits vocab-parallel: log-probs of given tokens come from megatron's vocab-parallel
cross-entropy, so no rank ever holds the full vocabulary. Value and reward heads are small linear layers
replicated across TP (their inputs are replicated, so their gradients agree across TP ranks).
"""

from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from mrlhf.ops.kv_ops import decode_linear


def vocab_parallel_logits(gpt, hidden: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """[s, b, h] -> this rank's vocabulary slice of the logits [s, b, v/tp], padded entries set to -inf. ``fused``
    (inference only) multiplies by the output weights with ``kv_ops.decode_linear`` instead of megatron's layer."""
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    if fused:
        layer = gpt.output_layer
        logits = decode_linear(hidden, layer.weight if weight is None else weight, layer.bias)
    else:
        logits, _ = gpt.output_layer(hidden, weight=weight)
    per_rank = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per_rank
    real = gpt.real_vocab_size
    if start + per_rank > real:  # this slice holds padding columns
        if fused:  # a fresh inference-only tensor: fill just the padding columns in place
            logits[..., max(real - start, 0) :] = float("-inf")
        else:
            logits = logits.masked_fill(_pad_columns(start, per_rank, real, logits.device), float("-inf"))
    return logits


@functools.cache
def _pad_columns(start: int, per_rank: int, real: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + per_rank, device=device) >= real


def token_logprobs(vp_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) from vocab-parallel logits. vp_logits [s, b, v/tp], targets [b, s] -> [b, s].

    megatron's vocab-parallel cross-entropy rewrites its input in place; it gets a float32 copy, so the caller's
    logits stay intact (PPO reads them again for the entropy)."""
    # vocab_parallel_cross_entropy returns -log p; it works on [s, b] layout
    own = vp_logits.float() if vp_logits.dtype != torch.float32 else vp_logits.clone()
    nll = tensor_parallel.vocab_parallel_cross_entropy(own, targets.t().contiguous())
    return -nll.t()


def vocab_parallel_entropy(vp_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the full (TP-split) vocabulary, differentiable: [s, b, v/tp] -> [b, s].

    H = log Z - sum(p * z) with z = logits - max; the partial sums of every TP rank are added with a collective whose
    backward is the identity. Padding columns (-inf) and anything 1e4 below the max contribute exactly 0."""
    from mrlhf.parallel import comm

    z = vp_logits.float()
    with torch.no_grad():
        zmax = comm.all_reduce_tp(z.max(dim=-1, keepdim=True).values, op=torch.distributed.ReduceOp.MAX)
    z = (z - zmax).clamp(min=-1e4)
    e = torch.exp(z)
    sums = comm.sum_tp_differentiable(torch.stack([e.sum(-1), (e * z).sum(-1)]))  # [2, s, b]
    return (torch.log(sums[0]) - sums[1] / sums[0]).t()


class ValueHead(torch.nn.Module):
    """Per-token scalar value (critic): [s, b, h] -> [b, s]."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).t().float()


class RewardHead(torch.nn.Module):
    """Scalar score of each sequence at its last real token: [s, b, h] + mask [b, s] -> [b]."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=dtype)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = attention_mask.shape[1]
        positions = torch.arange(s, device=attention_mask.device)
        last = torch.where(attention_mask, positions, -1).max(dim=1).values.clamp(min=0)  # [b]
        picked = hidden[last, torch.arange(hidden.shape[1], device=hidden.device)]  # [b, h]
        return self.linear(picked).squeeze(-1).float()
