"""PPO policy and value losses as pure tensor functions, and their aggregation over the global batch.

Losses are per token, [b, s]; ``aggregate`` turns one microbatch into its share of the global loss, normalised by
global token / sequence counts, so that gradient accumulation and data parallelism never change the result.
(Reward-model and DPO losses live in ``mrlhf.rl.losses``.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    level: str = "token",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: -> (loss [b, s], clipped [b, s] 0/1, approx_kl [b, s]); gradient through logp only.

    ``level`` 'token' (PPO, GRPO): each token's own ratio. 'sequence' (GSPO, Zheng et al. 2025; TRL's
    ``importance_sampling_level="sequence"``): every token of a row takes the row's ratio, the geometric mean of its
    tokens' ratios over ``mask`` -- ``exp(mean_t(logp - old_logp))`` -- clipped as one (GSPO's ranges are ~1e-3
    wide, not 0.2), so the gradient reaches each token with weight ``1/|y|``. ``approx_kl`` stays per token."""
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"PPO clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance sampling level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
    old_logp, advantages = old_logp.detach(), advantages.detach()
    token_log_ratio = log_ratio = logp - old_logp
    if level == "sequence":
        if mask is None:
            raise ValueError("a sequence-level ratio needs the mask of the tokens it averages over")
        m = mask.to(log_ratio.dtype)
        per_row = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = per_row.expand_as(token_log_ratio)
    ratio = torch.exp(log_ratio)
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(surr1, surr2)
    clipped = (surr2 > surr1).to(loss.dtype)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    token_ratio = torch.exp(token_log_ratio.detach())
    approx_kl = (token_ratio - 1.0) - token_log_ratio.detach()
    return loss, clipped, approx_kl


IMPORTANCE_LEVELS = ("token", "sequence")


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_clipped - R)^2)``: -> (loss [b, s], clipped [b, s] 0/1)."""
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    if clip_eps < 0:
        raise ValueError(f"value clip_eps must be >= 0 (or None), got {clip_eps}")
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped_loss = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped_loss)
    return loss, (clipped_loss > unclipped).to(loss.dtype)


def _masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Loss on masked tokens, exactly 0 elsewhere."""
    return torch.where(mask.bool(), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def _token_mean(loss, mask, global_tokens, global_seqs, constant) -> torch.Tensor:
    return _masked(loss, mask).sum() / max(float(global_tokens), 1.0)


def _seq_mean_token_mean(loss, mask, global_tokens, global_seqs, constant) -> torch.Tensor:
    row_tokens = mask.to(loss.dtype).sum(-1).clamp(min=1)
    return (_masked(loss, mask).sum(-1) / row_tokens).sum() / max(float(global_seqs), 1.0)


def _seq_mean_token_sum_norm(loss, mask, global_tokens, global_seqs, constant) -> torch.Tensor:
    if constant is None or constant <= 0:
        raise ValueError(
            f"'seq-mean-token-sum-norm' needs a constant > 0 (e.g. the max response length), got {constant}"
        )
    return _masked(loss, mask).sum() / (max(float(global_seqs), 1.0) * float(constant))


LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_tokens: float,
    global_seqs: float,
    constant: float | None = None,
) -> torch.Tensor:
    """This microbatch's share of the global loss: summed over microbatches and ranks it gives the aggregate."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[mode](loss, mask, global_tokens, global_seqs, constant)
