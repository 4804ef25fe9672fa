"""Losses as pure tensor functions: pairwise reward model, the DPO family, SFT NLL.

Each returns per-example losses (shape [b]); the caller sums and normalises over the global batch, so that
gradient accumulation and data parallelism never change the result. Variants sit in small registries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def pairwise_rm_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0
) -> torch.Tensor:
    """Bradley-Terry ``-log sigmoid(r_c - r_r - margin)`` plus ``center_coef * (r_c + r_r)^2``; [b] -> [b]."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over masked (response) tokens: [b, s], [b, s] -> [b]."""
    return (token_logprobs * mask).sum(-1)


def _dpo_logits(pi_c, pi_r, ref_c, ref_r) -> torch.Tensor:
    """(log pi(c)/ref(c)) - (log pi(r)/ref(r)), the DPO preference logit before beta."""
    return (pi_c - ref_c) - (pi_r - ref_r)


def dpo_sigmoid(pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al.); with label_smoothing > 0 the conservative cDPO variant."""
    z = beta * _dpo_logits(pi_c, pi_r, ref_c, ref_r)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_ipo(pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al.): squared distance of the log-ratio difference from 1/(2 beta)."""
    return (_dpo_logits(pi_c, pi_r, ref_c, ref_r) - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": dpo_sigmoid, "ipo": dpo_ipo}


def dpo_loss(name: str, pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    if name not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {name!r}; expected one of {sorted(DPO_LOSSES)}")
    return DPO_LOSSES[name](pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)


def implicit_rewards(pi_c, pi_r, ref_c, ref_r, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards ``beta * log(pi/ref)`` of chosen and rejected: [b], [b]."""
    return beta * (pi_c - ref_c), beta * (pi_r - ref_r)
