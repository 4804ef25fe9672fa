"""KL divergence to the reference policy: per-token estimators and the KL coefficient controllers.

The estimators (Schulman's k1/k2/k3) take per-token log-probs of the sampled tokens under the policy and the
reference, [b, s] -> [b, s]; the caller masks them. The controllers hold the KL coefficient beta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, high-variance ``log(pi/ref)``: [b, s] -> [b, s]."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Low-variance, biased ``0.5 * log(pi/ref)^2``: [b, s] -> [b, s]."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, non-negative ``ref/pi - log(ref/pi) - 1``: [b, s] -> [b, s]."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(
    name: str,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    log_ratio_clamp: float | None = 20.0,
    k3_max: float | None = 10.0,
) -> torch.Tensor:
    """Per-token KL estimate ``name`` with ``log(pi/ref)`` clamped to +-log_ratio_clamp and k3 to <= k3_max: [b, s]."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; expected one of {sorted(KL_ESTIMATORS)}")
    if log_ratio_clamp is not None:
        if log_ratio_clamp <= 0:
            raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp}")
        logp = ref_logp + (logp - ref_logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    kl = KL_ESTIMATORS[name](logp, ref_logp)
    if name == "k3" and k3_max is not None:
        kl = kl.clamp(max=k3_max)
    return kl


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): steers the measured KL towards ``target`` over ``horizon``."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"adaptive KL controller needs target > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL controller needs horizon > 0, got {horizon}")
        self.value = float(init_coef)
        self.init_coef = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "init_coef": self.init_coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.init_coef = float(d.get("init_coef", self.init_coef))
        self.target = float(d.get("target", self.target))
        self.horizon = int(d.get("horizon", self.horizon))


KL_CONTROLLERS = ("fixed", "adaptive")


def build_kl_controller(
    kind: str, coef: float, target: float | None = None, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """A "fixed" or "adaptive" KL controller starting at ``coef``."""
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target is None or target <= 0:
            raise ValueError(f"adaptive KL controller needs target > 0, got {target}")
        return AdaptiveKLController(coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; expected one of {list(KL_CONTROLLERS)}")
