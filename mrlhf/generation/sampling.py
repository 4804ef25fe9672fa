"""Token choice from vocab-parallel logits, never gathering the full vocabulary on one rank.

Each TP rank holds logits for global vocab ids ``[vocab_start, vocab_start + V_local)``. Greedy takes a local
argmax and reduces (value, id) pairs over TP. Sampling is the Gumbel-max trick: ``argmax(logits / T + g)`` with
noise ``g`` from a counter-based hash of (seed, sequence id, step, global vocab id) -- so the sample of a sequence
is the same under any TP layout, microbatching or slot assignment, and every TP rank picks the same token. The noise
comes from ``mrlhf::uniform_noise`` on the CPU (bit-identical to its torch twin, which serves other devices).
Top-k keeps the k largest logits (local top-k, gathered k*tp candidates); top-p keeps the smallest set of those
candidates whose probability reaches p (exact when the nucleus lies within ``top_p_candidates`` tokens).

The returned log-prob of each token is under the *sampling* temperature over the full vocabulary (before top-k/p
truncation), the quantity a training-mode forward of the finished sequence computes at the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from mrlhf.ops.kv_ops import row_softmax_stats, uniform_noise
from mrlhf.parallel import comm


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    top_p_candidates: int = 1024

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def _global_argmax(
    values: torch.Tensor, vocab_start: int, local: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """argmax over the TP-split last dim of ``values`` [B, V_local]; ties go to the lowest global id. ``local`` is
    ``values.max(dim=-1)`` when the caller has it already."""
    local_val, local_idx = values.max(dim=-1) if local is None else local
    if _tp_size() == 1:  # the local argmax is the answer (what the gather below would return, without its ops)
        return local_idx + vocab_start
    pair = torch.stack([local_val.double(), (local_idx + vocab_start).double()], dim=-1)  # [B, 2]
    parts = torch.stack(comm.all_gather_tp(pair))  # [tp, B, 2]
    best = parts[..., 0].argmax(dim=0)  # first rank holding the max -> lowest id among ties
    return parts[best, torch.arange(parts.shape[1], device=parts.device), 1].long()


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the TP-split last dim: [B, V_local] -> [B] (float32)."""
    x = logits.float()
    m = x.max(dim=-1).values
    comm.all_reduce_tp(m, op=torch.distributed.ReduceOp.MAX)
    s = torch.exp(x - m[:, None]).sum(dim=-1)
    comm.all_reduce_tp(s)
    return m + torch.log(s)


def _merge_logsumexp(local_max: torch.Tensor, local_sumexp: torch.Tensor) -> torch.Tensor:
    """logsumexp over the TP-split vocabulary from each rank's (max, sum(exp(x - max))): [B], [B] -> [B]. A rank whose
    slice is all -inf (sum 0) adds nothing."""
    if _tp_size() == 1:  # the merge below reduces to this, bit for bit
        return local_max + torch.log(local_sumexp)
    m = comm.all_reduce_tp(local_max.clone(), op=torch.distributed.ReduceOp.MAX)
    scale = torch.where(local_sumexp > 0, torch.exp(local_max - m), torch.zeros_like(local_sumexp))
    s = comm.all_reduce_tp(local_sumexp * scale)
    return m + torch.log(s)


def gather_token_logits(logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """The logit of each row's token, wherever in the vocab split it lives: [B, V_local], [B] -> [B]."""
    if _tp_size() == 1:
        return logits.float().gather(-1, (tokens - vocab_start)[:, None]).squeeze(-1)
    local = tokens - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = logits.float().gather(-1, local.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(-1)
    picked = torch.where(inside, picked, torch.zeros_like(picked))
    comm.all_reduce_tp(picked)
    return picked


def _candidates_threshold(scaled: torch.Tensor, k: int, top_p: float) -> torch.Tensor:
    """Lowest kept scaled logit per row [B] for top-k and/or top-p, from gathered local top candidates."""
    vals = scaled.topk(min(k, scaled.shape[-1]), dim=-1).values  # [B, k_local]
    cand = torch.cat(comm.all_gather_tp(vals), dim=-1).sort(dim=-1, descending=True).values  # [B, k*tp]
    cand = cand[:, :k]
    keep = torch.ones_like(cand, dtype=torch.bool)
    if top_p < 1.0:
        lse = vocab_parallel_logsumexp(scaled)
        probs = torch.exp(cand.float() - lse[:, None])
        before = probs.cumsum(-1) - probs  # mass of strictly better candidates
        keep &= before < top_p
    keep[:, 0] = True
    idx = keep.long().sum(-1) - 1
    return cand.gather(-1, idx[:, None]).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    seq_ids: torch.Tensor,
    step: int,
    vocab_start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row from vocab-parallel ``logits`` [B, V_local] (padding columns already -inf).

    Returns (tokens [B] int64, log-probs [B] float32 under temperature-scaled full softmax; greedy uses T=1).
    """
    temp = 1.0 if params.greedy else params.temperature
    scaled = logits.float() if temp == 1.0 else logits.float() / temp
    if params.greedy:  # one call for the max, its index and the local sum of exponentials (mrlhf::row_softmax_stats)
        local_max, local_arg, local_sumexp = row_softmax_stats(scaled)
        tokens = _global_argmax(scaled, vocab_start, (local_max, local_arg))
        lse = _merge_logsumexp(local_max, local_sumexp)
        return tokens, gather_token_logits(scaled, tokens, vocab_start) - lse
    else:
        choice = scaled
        if params.top_k > 0 or params.top_p < 1.0:
            k = params.top_k if params.top_k > 0 else params.top_p_candidates
            threshold = _candidates_threshold(scaled, k, params.top_p)
            choice = scaled.masked_fill(scaled < threshold[:, None], float("-inf"))
        # Gumbel noise -log(-log(u)) [B, V_local] float64 and choice + g, in place: the same torch kernels as out of
        # place, so the same bits, without six fresh [B, V] buffers (each one page-faulted in). The log stays
        # torch's (csrc/sampling.cpp says why).
        u = uniform_noise(params.seed, seq_ids, step, vocab_start, logits.shape[-1]).to(choice.device)
        gumbel = u.log_().neg_().log_().neg_()
        tokens = _global_argmax(gumbel.add_(choice), vocab_start)  # choice + g in double: fp32 -> fp64 is exact
    logprobs = gather_token_logits(scaled, tokens, vocab_start) - vocab_parallel_logsumexp(scaled)
    return tokens, logprobs
