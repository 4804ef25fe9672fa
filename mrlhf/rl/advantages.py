"""Advantage estimation as pure tensor functions: masked statistics, KL-shaped rewards, GAE, REINFORCE++, GRPO, RLOO.

Token tensors are [b, s]; ``mask``/``action_mask`` (float or bool) is 1 on response (action) tokens, one contiguous
span per row, possibly empty. Outputs are exactly 0 outside the mask and never NaN for empty rows. Statistics that
span data-parallel ranks go through an optional ``reduce(t) -> t`` callback that sums ``t`` in place over the ranks
(None: single process); each call carries one float64 tensor, and every rank makes the same calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32 for accumulation."""
    return torch.promote_types(x.dtype, torch.float32)


def _mask_out(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` on masked positions, exactly 0 elsewhere (garbage outside the mask cannot leak, even inf/NaN)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(x * mask)``: [b, s], [b, s] -> scalar."""
    return (x * mask.to(x.dtype)).sum()


def _global_sum_count(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sum and token count, summed over ranks in one reduce call; the gradient flows through the local sum."""
    m = mask.to(_acc_dtype(x))
    s = (x.to(m.dtype) * m).sum()
    c = m.sum()
    if reduce is None:
        return s, c
    stats = torch.stack([s.detach(), c]).to(torch.float64)
    reduce(stats)
    total = s + (stats[0].to(s.dtype) - s.detach())  # global value, local gradient
    return total, stats[1].to(s.dtype)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, reduce: Reduce | None = None
) -> torch.Tensor:
    """Mean over masked entries: global scalar (over ranks with ``reduce``) or, with ``dim``, per row (local only)."""
    if dim is not None:
        m = mask.to(_acc_dtype(x))
        return ((x.to(m.dtype) * m).sum(dim) / m.sum(dim).clamp(min=1)).to(x.dtype)
    s, c = _global_sum_count(x, mask, reduce)
    return (s / c.clamp(min=1)).to(x.dtype)


def _masked_mean_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global masked mean and population variance (two-pass, two reduce calls), in at least fp32."""
    xa = x.to(_acc_dtype(x))
    mean = masked_mean(xa, mask, reduce=reduce)
    var = masked_mean((xa - mean) ** 2, mask, reduce=reduce)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Population variance over masked entries (global with ``reduce``): [b, s] -> scalar."""
    return _masked_mean_var(x, mask, reduce)[1].to(x.dtype)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` (mean kept if not shift_mean) with global masked stats, 0 off-mask: [b, s]."""
    mean, var = _masked_mean_var(x, mask, reduce)
    xa = x.to(mean.dtype)
    white = (xa - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return _mask_out(white.to(x.dtype), mask)


def _last_action_onehot(mask: torch.Tensor) -> torch.Tensor:
    """Bool [b, s], True at the last action token of each row (all False for rows without actions)."""
    m = mask.bool()
    idx = torch.arange(m.shape[-1], device=m.device)
    last = torch.where(m, idx, -1).amax(-1, keepdim=True) if m.shape[-1] else idx.new_full((m.shape[0], 1), -1)
    return (idx == last) & (last >= 0)


def _add_scores_at_last_token(token_rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``token_rewards`` (masked) plus ``scores[i]`` at the last action token of row i: [b, s]."""
    last = _last_action_onehot(mask)
    scores = scores.to(token_rewards.dtype).reshape(-1, 1)
    return _mask_out(token_rewards, mask) + torch.where(last, scores, torch.zeros_like(scores))


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """``-kl_coef * kl`` on action tokens plus the sequence score at the last one: [b], [b, s], [b, s] -> [b, s]."""
    return _add_scores_at_last_token(-kl_coef * kl, scores, action_mask)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over action tokens: -> (advantages [b, s], returns [b, s])."""
    dtype = torch.promote_types(_acc_dtype(rewards), values.dtype)
    rewards, values, m = rewards.detach().to(dtype), values.detach().to(dtype), mask.bool()
    b, s = rewards.shape
    adv = torch.zeros((b, s), dtype=dtype, device=rewards.device)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    last = torch.zeros(b, dtype=dtype, device=rewards.device)
    for t in reversed(range(s)):
        if t + 1 < s:
            next_v = torch.where(m[:, t + 1], values[:, t + 1], zero)
            last_next = torch.where(m[:, t + 1], last, zero)
        else:
            next_v = last_next = torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last_next
        adv[:, t] = torch.where(m[:, t], last, zero)
    returns = _mask_out(adv + values, m)
    return adv, returns


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return-to-go over action tokens (REINFORCE++), 0 off-mask: [b, s] -> [b, s]."""
    dtype = _acc_dtype(rewards)
    rewards, m = rewards.detach().to(dtype), mask.bool()
    b, s = rewards.shape
    out = torch.zeros((b, s), dtype=dtype, device=rewards.device)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    running = torch.zeros(b, dtype=dtype, device=rewards.device)
    for t in reversed(range(s)):
        nxt = torch.where(m[:, t + 1], running, zero) if t + 1 < s else torch.zeros_like(running)
        running = torch.where(m[:, t], rewards[:, t] + gamma * nxt, zero)
        out[:, t] = running
    return out


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scores [N] as [N // group_size, group_size], contiguous blocks; validates the group size."""
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group advantages need group_size >= 2 (samples per prompt), got {group_size!r}")
    if scores.dim() != 1:
        raise ValueError(f"group advantages need scores of shape [N], got {tuple(scores.shape)}")
    if scores.numel() % group_size:
        raise ValueError(
            f"{scores.numel()} scores do not split into groups of {group_size}: N must be a multiple of group_size"
        )
    return scores.to(_acc_dtype(scores)).view(-1, group_size)


def _flat(g: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[G, 1] True where a group gives a group estimator no signal: its valid rewards are all equal, or fewer than
    two of its rows are valid (no baseline)."""
    first = torch.where(v, g, float("inf")).min(-1, keepdim=True).values  # one valid reward of the group
    return (torch.where(v, g, first) == first).all(-1, keepdim=True) | (k < 2)


def flat_groups(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] scores in groups of the ``group_size`` samples of a prompt -> [N / group_size] bool: the groups GRPO and
    RLOO draw no signal from (DAPO's dynamic sampling drops them; PPO counts them as ``flat_group_fraction``)."""
    return _flat(*_valid_groups(scores, group_size, valid)).squeeze(-1)


def _zero_unusable_groups(adv: torch.Tensor, g: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exactly 0 for invalid rows and for flat groups (no signal; avoids rounding noise)."""
    return torch.where(_flat(g, v, k) | ~v, torch.zeros_like(adv), adv)


def _valid_groups(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None):
    """Scores and validity as [N // group_size, group_size] (every row valid without ``valid``), and the valid count
    per group [G, 1]."""
    g = _groups(scores, group_size)
    v = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.reshape(g.shape).to(g.device)
    return g, v, v.sum(-1, keepdim=True).to(g.dtype)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """GRPO: ``(r - group mean) / (group std + eps)``; Dr. GRPO (scale_by_std False): ``r - group mean``. [N] -> [N].
    ``valid`` [N] bool: only valid rows enter their group's mean and (sample) std, invalid rows get 0 -- a dropped
    sample changes nobody's baseline; a group with fewer than two valid rows has no baseline and gets 0."""
    g, v, k = _valid_groups(scores, group_size, valid)
    adv = g - _mask_out(g, v).sum(-1, keepdim=True) / k.clamp(min=1)
    if scale_by_std and g.numel():
        var = _mask_out(adv**2, v).sum(-1, keepdim=True) / (k - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return _zero_unusable_groups(adv, g, v, k).reshape(-1).to(scores.dtype)


def rloo_advantages(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO: each reward minus the mean of the other ``group_size - 1`` rewards of its group: [N] -> [N]. With
    ``valid`` [N] bool, the other *valid* rewards (k - 1 of them); invalid rows and groups of fewer than two valid rows
    get 0."""
    g, v, k = _valid_groups(scores, group_size, valid)
    adv = g - (_mask_out(g, v).sum(-1, keepdim=True) - g) / (k - 1).clamp(min=1)
    return _zero_unusable_groups(adv, g, v, k).reshape(-1).to(scores.dtype)


def _est_gae(scores, kl_rewards, mask, values, gamma, lam, group_size, eps, scale_by_std, whiten, reduce, valid):
    if values is None:
        raise ValueError("gae needs the critic's values")
    rewards = _add_scores_at_last_token(kl_rewards, scores, mask)
    adv, returns = gae(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, mask, reduce=reduce)
    return adv, returns


def _est_reinforce_pp(scores, kl_rewards, mask, values, gamma, lam, group_size, eps, scale_by_std, whiten, reduce,
                      valid):  # fmt: skip
    rewards = _add_scores_at_last_token(kl_rewards, scores, mask)
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, reduce=reduce), None


def _seq_scores(scores: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence score plus the summed per-token KL reward terms: [b]."""
    kl = _mask_out(kl_rewards.to(_acc_dtype(kl_rewards)), mask)
    return scores.to(kl.dtype).reshape(-1) + kl.sum(-1)


def _broadcast(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _mask_out(adv.reshape(-1, 1).expand(mask.shape), mask)


def _est_grpo(scores, kl_rewards, mask, values, gamma, lam, group_size, eps, scale_by_std, whiten, reduce, valid):
    adv = grpo_advantages(_seq_scores(scores, kl_rewards, mask), group_size, eps, scale_by_std, valid)
    return _broadcast(adv, mask), None


def _est_rloo(scores, kl_rewards, mask, values, gamma, lam, group_size, eps, scale_by_std, whiten, reduce, valid):
    return _broadcast(rloo_advantages(_seq_scores(scores, kl_rewards, mask), group_size, valid), mask), None


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "gae": _est_gae,
    "grpo": _est_grpo,
    "rloo": _est_rloo,
    "reinforce++": _est_reinforce_pp,
}
ESTIMATORS_NEED_CRITIC = {"gae"}
GROUP_ESTIMATORS = {"grpo", "rloo"}


@torch.no_grad()
def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    kl_rewards: torch.Tensor,
    action_mask: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    group_size: int = 1,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    whiten: bool = True,
    reduce: Reduce | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token advantages [b, s] and critic returns [b, s] (None without a critic) from scores [b] and KL terms [b, s].
    ``valid`` [b] bool: rows with a finite reward; group estimators take their baselines from valid rows only (the
    per-token estimators see dropped rows through ``action_mask``, which must be 0 on them)."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    if kl_rewards.shape != action_mask.shape:
        raise ValueError(f"kl_rewards {tuple(kl_rewards.shape)} and action_mask {tuple(action_mask.shape)} differ")
    if scores.numel() != action_mask.shape[0]:
        raise ValueError(f"{scores.numel()} scores for {action_mask.shape[0]} rows")
    return ADVANTAGE_ESTIMATORS[estimator](
        scores, kl_rewards, action_mask, values, gamma, lam, group_size, eps, scale_by_std, whiten, reduce, valid
    )


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment of responses of ``lengths`` generated tokens [b] -> [b]: 0 up to ``max_len -
    buffer`` tokens, then rising linearly to ``penalty`` at ``max_len`` (where truncation happens)."""
    start = max_len - buffer
    return penalty * ((lengths.to(torch.float32) - start) / buffer).clamp(0.0, 1.0)


class RewardNormalizer:
    """Running mean/std of raw sequence scores (Chan et al. parallel combination), initialised from an RM's stats."""

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        count: float = 0.0,
        clip: float | None = None,
        update: bool = True,
        eps: float = 1e-8,
    ):
        if std < 0 or count < 0:
            raise ValueError(f"reward normalizer needs std >= 0 and count >= 0, got std={std}, count={count}")
        if clip is not None and clip <= 0:
            raise ValueError(f"reward normalizer clip must be > 0 or None, got {clip}")
        self._mean = float(mean)
        self._std0 = float(std)  # reported while count is 0
        self._count = float(count)
        self._m2 = float(std) ** 2 * float(count)
        self.clip = clip
        self.update_stats = bool(update)
        self.eps = float(eps)

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        return (self._m2 / self._count) ** 0.5 if self._count > 0 else self._std0

    @property
    def count(self) -> float:
        return self._count

    def update(self, scores: torch.Tensor, reduce: Reduce | None = None) -> None:
        """Fold this batch's scores [N] (all ranks, one reduce call) into the running statistics."""
        if not self.update_stats:
            return
        d = scores.detach().reshape(-1).to(torch.float64) - self._mean  # shift by the (rank-identical) running mean
        stats = torch.stack([d.new_tensor(float(d.numel())), d.sum(), (d * d).sum()])
        if reduce is not None:
            reduce(stats)
        n, s1, s2 = stats.tolist()
        if n <= 0:
            return
        delta = s1 / n  # batch mean - running mean
        batch_m2 = max(s2 - s1 * s1 / n, 0.0)
        total = self._count + n
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self._count * n / total
        self._count = total

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - mean) / max(std, eps)``, clamped to +-clip when set: [N] -> [N]."""
        x = scores if scores.is_floating_point() else scores.float()
        out = (x - self._mean) / max(self.std, self.eps)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def state_dict(self) -> dict:
        return {"mean": self._mean, "std": self.std, "count": self._count, "m2": self._m2}

    def load_state_dict(self, d: dict) -> None:
        self._mean = float(d["mean"])
        self._std0 = float(d["std"])
        self._count = float(d["count"])
        self._m2 = float(d["m2"]) if "m2" in d else self._std0**2 * self._count
