"""The pure parts of the optimizer module: the learning-rate schedule and the ZeRO-1 owner partition."""

from __future__ import annotations

import math

import pytest

from mrlhf.config import OptimizerConfig, SchedulerConfig
from mrlhf.trainers.optim import assign_owners, lr_at

OPT = OptimizerConfig(lr=1.0, min_lr=0.1)


def sched(decay: str = "cosine", warmup: int = 0) -> SchedulerConfig:
    return SchedulerConfig(warmup_steps=warmup, decay=decay)


# ---- warmup ----


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_is_linear(decay: str) -> None:
    s = sched(decay, warmup=4)
    assert lr_at(0, 20, OPT, s) == pytest.approx(1.0 / 4)
    assert [lr_at(i, 20, OPT, s) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, 20, OPT, s) == pytest.approx(1.0)  # first step after warmup: peak lr


def test_warmup_step_zero_with_real_lr() -> None:
    opt = OptimizerConfig(lr=3e-3, min_lr=3e-4)
    assert lr_at(0, 150, opt, sched(warmup=10)) == pytest.approx(3e-4)


def test_no_warmup_starts_at_peak() -> None:
    for decay in ("cosine", "linear", "constant"):
        assert lr_at(0, 10, OPT, sched(decay)) == pytest.approx(1.0)


# ---- cosine ----


def test_cosine_endpoints() -> None:
    s = sched("cosine", warmup=2)
    assert lr_at(2, 12, OPT, s) == pytest.approx(1.0)
    assert lr_at(12, 12, OPT, s) == pytest.approx(0.1)
    assert lr_at(50, 12, OPT, s) == pytest.approx(0.1)  # clamped past the end


def test_cosine_hand_computed() -> None:
    s = sched("cosine", warmup=2)
    # step 7 of 12 with 2 warmup: progress 5/10 = 0.5 -> halfway between lr and min_lr
    assert lr_at(7, 12, OPT, s) == pytest.approx(0.55)
    # step 4 of 10 with 2 warmup: progress 2/8 = 0.25 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/4))
    assert lr_at(4, 10, OPT, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))
    assert lr_at(4, 10, OPT, s) == pytest.approx(0.8681980515)


def test_cosine_monotone_after_warmup() -> None:
    s = sched("cosine", warmup=3)
    lrs = [lr_at(i, 30, OPT, s) for i in range(3, 31)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert all(0.1 - 1e-12 <= v <= 1.0 + 1e-12 for v in lrs)


# ---- linear / constant ----


def test_linear_decay() -> None:
    s = sched("linear", warmup=2)
    assert lr_at(2, 12, OPT, s) == pytest.approx(1.0)
    assert lr_at(7, 12, OPT, s) == pytest.approx(0.55)
    assert lr_at(4, 12, OPT, s) == pytest.approx(1.0 - 0.9 * 0.2)
    assert lr_at(12, 12, OPT, s) == pytest.approx(0.1)
    assert lr_at(20, 12, OPT, s) == pytest.approx(0.1)
    lrs = [lr_at(i, 12, OPT, s) for i in range(2, 13)]
    diffs = [a - b for a, b in zip(lrs, lrs[1:])]
    assert diffs == pytest.approx([0.09] * 10)


def test_constant_after_warmup() -> None:
    s = sched("constant", warmup=2)
    assert [lr_at(i, 10, OPT, s) for i in range(2, 15)] == pytest.approx([1.0] * 13)


def test_min_lr_zero() -> None:
    opt = OptimizerConfig(lr=1e-3, min_lr=0.0)
    assert lr_at(5, 10, opt, sched("cosine")) == pytest.approx(0.5e-3)
    assert lr_at(10, 10, opt, sched("cosine")) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_total_steps_equal_to_warmup_does_not_divide_by_zero(decay: str) -> None:
    s = sched(decay, warmup=5)
    assert lr_at(4, 5, OPT, s) == pytest.approx(1.0)  # last warmup step: (4 + 1) / 5 of the peak
    # no decay phase: progress = (5 - 5) / max(1, 5 - 5) = 0 -> the peak; one step later (6 - 5) / 1 = 1 -> min_lr
    assert lr_at(5, 5, OPT, s) == pytest.approx(1.0)
    assert lr_at(6, 5, OPT, s) == pytest.approx(0.1)
    assert lr_at(9, 5, OPT, s) == pytest.approx(0.1)  # clamped


# ---- ZeRO-1 owners ----


def test_assign_owners_hand_checked() -> None:
    # loads: 10->r0 [10,0]; 5->r1 [10,5]; 5->r1 [10,10]; 3->r0 (tie, lowest) [13,10]; 2->r1 [13,12]
    assert assign_owners([10, 5, 5, 3, 2], 2) == [0, 1, 1, 0, 1]
    # three ranks: 4->0, 4->1, 4->2, 1->0, 1->1, 1->2, 6->0
    assert assign_owners([4, 4, 4, 1, 1, 1, 6], 3) == [0, 1, 2, 0, 1, 2, 0]


def test_assign_owners_greedy_in_given_order() -> None:
    # loads [0,0,0]: 7->r0 [7,0,0]; 3->r1 [7,3,0]; 3->r2 [7,3,3]; 2->r1 (tie 3/3, lowest) [7,5,3];
    # 6->r2 [7,5,9]; 1->r1 [7,6,9]
    assert assign_owners([7, 3, 3, 2, 6, 1], 3) == [0, 1, 2, 1, 2, 1]
    # the given order is kept (no largest-first sort, which every rank must agree on anyway):
    # 1->r0 [1,0]; 1->r1 [1,1]; 10->r0 (tie, lowest) [11,1]; 1->r1 [11,2]; 1->r1 [11,3]
    assert assign_owners([1, 1, 10, 1, 1], 2) == [0, 1, 0, 1, 1]


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 8])
def test_assign_owners_balanced_and_covering(dp: int) -> None:
    sizes = [(i * 7919) % 1000 + 1 for i in range(40)]
    owners = assign_owners(sizes, dp)
    assert set(owners) == set(range(dp))  # every rank owns something when there are enough params
    loads = [sum(n for n, o in zip(sizes, owners) if o == r) for r in range(dp)]
    # greedy least-loaded: no rank exceeds another by more than the largest parameter
    assert max(loads) - min(loads) <= max(sizes)
    assert sum(loads) == sum(sizes)


def test_assign_owners_single_rank_and_few_params() -> None:
    assert assign_owners([3, 1, 2], 1) == [0, 0, 0]
    assert assign_owners([5, 5], 4) == [0, 1]
    assert assign_owners([], 3) == []
