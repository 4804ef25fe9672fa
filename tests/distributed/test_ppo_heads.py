"""PPO heads under tensor parallelism: the vocab-parallel entropy and its gradient, token log-probs, and an actor's
tempered log-probs and entropy, each against a float64 computation over the full vocabulary.

Tolerance: 1e-6 absolute for the heads on fixed fp32 logits (|logits| ~ 2.5 sigma, 13 real columns), 2e-6 for the
actor (its float32 logits are divided by the temperature in float32 before the head runs).
"""

import pytest
import torch
from harness import run_ranks
from ppo_head_runs import (
    REAL,
    TINY_LOGIT,
    actor_rank,
    entropy_rank,
    entropy_weight,
    head_logits,
    head_targets,
    logprobs_rank,
)

HEAD_TOL = 1e-6
ACTOR_TOL = 2e-6


def reference_entropy() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 entropy [b, s] of softmax over the real columns, and the gradient of sum(entropy * w) w.r.t. all V
    columns (padding columns get exactly 0)."""
    full = head_logits().double()
    real = full[..., :REAL].clone().requires_grad_(True)
    logp = torch.log_softmax(real, dim=-1)
    ent = -(logp.exp() * logp).sum(-1).t()  # [b, s]
    (ent * entropy_weight()).sum().backward()
    grad = torch.cat([real.grad, torch.zeros(*full.shape[:2], full.shape[-1] - REAL, dtype=torch.float64)], dim=-1)
    return ent.detach(), grad


def reference_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[s, b, V] -> log p(targets) [b, s] in float64 over the real columns."""
    logp = torch.log_softmax(logits.double()[..., :REAL], dim=-1)
    return logp.gather(-1, head_targets().t().unsqueeze(-1)).squeeze(-1).t()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_reference_is_not_trivial() -> None:
    ent, grad = reference_entropy()
    assert float(ent.min()) > 0.3 and float(ent.max()) < torch.log(torch.tensor(float(REAL)))
    assert float(grad[..., :REAL].abs().max()) > 1e-2  # a gradient worth comparing
    s, b, c = TINY_LOGIT
    assert float(grad[s, b, c].abs()) < 1e-300  # the 3e4-below logit does not matter


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_entropy_and_gradient(tp: int) -> None:
    want_ent, want_grad = reference_entropy()
    results = run_ranks(entropy_rank, tp, tp)
    assert sorted(r["tp_rank"] for r in results) == list(range(tp))
    for r in results:
        assert r["entropy"].shape == (3, 5) and r["entropy"].dtype == torch.float32
        assert max_abs(r["entropy"], want_ent) <= HEAD_TOL, (tp, r["tp_rank"], max_abs(r["entropy"], want_ent))
        want = want_grad.chunk(tp, dim=-1)[r["tp_rank"]]
        assert r["grad"].shape == want.shape
        assert torch.isfinite(r["grad"]).all()
        assert max_abs(r["grad"], want) <= HEAD_TOL, (tp, r["tp_rank"], max_abs(r["grad"], want))
    if tp == 2:  # the padding sits on rank 1: its gradient there is exactly 0
        pad = next(r for r in results if r["tp_rank"] == 1)["grad"][..., REAL - 8 :]
        assert torch.equal(pad, torch.zeros_like(pad))


@pytest.mark.parametrize("tp", [1, 2])
def test_token_logprobs_leaves_its_input_alone_and_equals_log_softmax(tp: int) -> None:
    want = reference_logprobs(head_logits())
    want_bf16 = reference_logprobs(head_logits().to(torch.bfloat16))
    for r in run_ranks(logprobs_rank, tp, tp):
        for name, ref in (("fp32", want), ("bf16", want_bf16)):
            got = r[name]
            assert got["unchanged"], (tp, r["tp_rank"], name)
            assert got["dtype"] == torch.float32
            assert got["logprobs"].shape == (3, 5)
            assert max_abs(got["logprobs"], ref) <= HEAD_TOL, (tp, name, max_abs(got["logprobs"], ref))


@pytest.mark.parametrize("tp", [1, 2])
def test_actor_tempered_logprobs_and_entropy(tp: int) -> None:
    results = run_ranks(actor_rank, tp, tp)
    for r in results:
        logits = r["logits"].double()  # [b, s, real vocab]: the same weights through vocab_parallel_logits
        assert logits.shape[-1] == 380 and torch.isfinite(logits).all()
        labels = r["labels"].unsqueeze(-1)
        logp07 = torch.log_softmax(logits / 0.7, dim=-1)
        want07 = logp07.gather(-1, labels).squeeze(-1)
        want_ent = -(logp07.exp() * logp07).sum(-1)
        want1 = torch.log_softmax(logits, dim=-1).gather(-1, labels).squeeze(-1)
        assert max_abs(r["lp07"], want07) <= ACTOR_TOL, (tp, max_abs(r["lp07"], want07))
        assert max_abs(r["entropy07"], want_ent) <= ACTOR_TOL, (tp, max_abs(r["entropy07"], want_ent))
        assert max_abs(r["lp1"], want1) <= ACTOR_TOL, (tp, max_abs(r["lp1"], want1))
        assert max_abs(r["lp07"], r["lp1"]) > 1e-2  # the temperature changed the distribution
        # logits_from=3 (PPO skips the prompt's logits): the same values from position 3 on, exactly 0 before it
        for got, want in ((r["lp07_from3"], want07), (r["entropy07_from3"], want_ent)):
            assert got.shape == want.shape and max_abs(got[:, 3:], want[:, 3:]) <= ACTOR_TOL, (tp, max_abs(got, want))
            assert (got[:, :3] == 0).all()
        for t, msg in r["refused"].items():
            assert msg is not None and "temperature must be finite and > 0" in msg, (t, msg)
        assert r["after_refusal"] == (1.0, False)  # a refused call leaves the previous setting
    if tp == 2:
        assert torch.equal(results[0]["lp07"], results[1]["lp07"])
