"""``trainers.ppo.actor_loss_fn`` on one CPU process: entropy bonus, KL in the loss, the ptx branch, the poison hook
and token-mean aggregation over the global token count.

One microbatch of 2 rows x 4 positions with 5 loss tokens. The current log-probs equal the old ones (ratio 1), so
the clipped surrogate is ``-A`` on every loss token and the policy term is ``sum(-A * mask) / tokens``; ``tokens``
(the global count over every microbatch and rank) is 10, twice the local 5. Off-mask positions hold large values that
must not leak. Every expected number is worked out by hand in the comments.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mrlhf.config import RunConfig, load_config
from mrlhf.trainers.ppo import actor_loss_fn  # needs no process group

PPO_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "ppo_demo.yaml")  # ppo.kl_coef 0.05


def t(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


MASK = t([1, 1, 0, 0], [1, 1, 1, 0])  # 5 loss tokens
LOGPROBS = t([-1.0, -2.0, 0.0, 0.0], [-0.5, -1.5, -1.0, 0.0])
ADVANTAGES = t([1.0, 2.0, 50.0, 50.0], [-1.0, 0.5, 3.0, 50.0])
# sum(-A * mask) = -(1 + 2) - (-1 + 0.5 + 3) = -5.5; / 10 tokens = -0.55
PG = -0.55
ENTROPY = t([0.5, 1.0, 9.0, 9.0], [2.0, 0.25, 0.25, 9.0])
# sum(entropy * mask) = 0.5 + 1 + 2 + 0.25 + 0.25 = 4.0; / 10 tokens = 0.4
ENTROPY_AGG = 0.4
# ref = logp - d with d = log(pi / ref) on the loss tokens: [[0.5, -1.0], [0.0, 0.25, -0.5]]
REF = LOGPROBS - t([0.5, -1.0, 7.0, 7.0], [0.0, 0.25, -0.5, 7.0])
TOKENS, SEQS = 10.0, 4.0


def config(*overrides: str) -> RunConfig:
    return load_config(PPO_YAML, list(overrides))


def microbatch(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss_mask": MASK, "old_logprobs": LOGPROBS.clone(), "advantages": ADVANTAGES, **extra}


def test_importing_the_trainer_starts_no_process_group() -> None:
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("tokens, expected", [(10.0, -0.55), (5.0, -1.1), (20.0, -0.275)])
def test_token_mean_divides_by_the_global_token_count(tokens: float, expected: float) -> None:
    """-5.5 summed over the local 5 tokens, divided by the ``tokens`` passed in (not by the local count)."""
    loss_fn = actor_loss_fn(config(), 0.05, tokens, SEQS, 0.0, poison=False)
    loss, stats = loss_fn(LOGPROBS.clone(), microbatch())  # no entropy bonus: a bare log-prob tensor
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["pg_loss_sum"].item() == pytest.approx(-5.5, abs=1e-12)  # statistics stay local sums
    assert stats["actor_tokens"].item() == 5.0


def test_entropy_bonus_is_subtracted() -> None:
    """``ppo.entropy_coef=0.1``: loss = -0.55 - 0.1 * 0.4 = -0.59 (a wrong sign would give -0.51); d loss / d entropy
    is -0.1 / 10 = -0.01 on loss tokens (more entropy lowers the loss), 0 elsewhere."""
    loss_fn = actor_loss_fn(config("ppo.entropy_coef=0.1"), 0.05, TOKENS, SEQS, 0.0, poison=False)
    entropy = ENTROPY.clone().requires_grad_()
    loss, _ = loss_fn((LOGPROBS.clone(), entropy), microbatch())
    assert loss.item() == pytest.approx(PG - 0.1 * ENTROPY_AGG, abs=1e-12)
    assert loss.item() == pytest.approx(-0.59, abs=1e-12)
    loss.backward()
    assert torch.allclose(entropy.grad, -0.01 * MASK, rtol=0, atol=1e-15)


# kl_placement=loss with the controller's kl_coef 0.2 (the argument, not the YAML's ppo.kl_coef 0.05):
#   k1 = d:                    sum = 0.5 - 1 + 0 + 0.25 - 0.5 = -0.75; / 10 = -0.075
#                              loss = -0.55 + 0.2 * -0.075 = -0.565      (wrong sign: -0.535)
#   k3 = exp(-d) + d - 1:      0.10653065971263342 + 0.7182818284590451 + 0 + 0.02880078307140499
#                              + 0.1487212707001282 = 1.0023345419432117; / 10 = 0.10023345419432117
#                              loss = -0.55 + 0.2 * 0.10023345419432117 = -0.5299533091611358 (wrong sign: -0.5700...)
@pytest.mark.parametrize("estimator, expected", [("k1", -0.565), ("k3", -0.5299533091611358)])
def test_kl_in_the_loss_is_added_with_the_controllers_coefficient(estimator: str, expected: float) -> None:
    cfg = config("ppo.kl_placement=loss", f"ppo.kl_estimator={estimator}")
    loss_fn = actor_loss_fn(cfg, 0.2, TOKENS, SEQS, 0.0, poison=False)
    loss, _ = loss_fn(LOGPROBS.clone(), microbatch(ref_logprobs=REF))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_kl_in_the_reward_leaves_the_loss_alone() -> None:
    loss_fn = actor_loss_fn(config("ppo.kl_placement=reward"), 0.2, TOKENS, SEQS, 0.0, poison=False)
    loss, _ = loss_fn(LOGPROBS.clone(), microbatch(ref_logprobs=REF))
    assert loss.item() == pytest.approx(PG, abs=1e-12)


def test_ptx_microbatch_is_the_weighted_next_token_loss() -> None:
    """A ptx microbatch: nll = -sum(logp * mask) = 1 + 2 + 0.5 + 1.5 + 1 = 6; loss = 0.5 * 6 / 4 ptx tokens = 0.75.
    No policy, entropy or KL term (the microbatch has no advantages or reference)."""
    cfg = config("ppo.ptx_coef=0.5", "ppo.ptx_path=ptx.jsonl", "ppo.entropy_coef=0.1", "ppo.kl_placement=loss")
    loss_fn = actor_loss_fn(cfg, 0.2, TOKENS, SEQS, 4.0, poison=False)
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, stats = loss_fn((logprobs, ENTROPY), {"ptx": torch.ones(()), "loss_mask": MASK})
    assert loss.item() == pytest.approx(0.75, abs=1e-12)
    assert stats["ptx_nll_sum"].item() == pytest.approx(6.0, abs=1e-12)
    loss.backward()
    assert torch.allclose(logprobs.grad, -0.5 / 4.0 * MASK, rtol=0, atol=1e-15)  # d loss / d logp = -coef / tokens


def test_poison_makes_the_loss_nan() -> None:
    cfg = config("ppo.entropy_coef=0.1")
    loss, stats = actor_loss_fn(cfg, 0.05, TOKENS, SEQS, 0.0, poison=True)((LOGPROBS.clone(), ENTROPY), microbatch())
    assert torch.isnan(loss)
    assert stats["pg_loss_sum"].item() == pytest.approx(-5.5, abs=1e-12)  # only the loss is poisoned
    clean, _ = actor_loss_fn(cfg, 0.05, TOKENS, SEQS, 0.0, poison=False)((LOGPROBS.clone(), ENTROPY), microbatch())
    assert torch.isfinite(clean)
