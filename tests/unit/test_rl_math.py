"""RL math (KL, advantages, PPO losses, EMA) against hand-computed values and a simulated 2-rank reduce."""

import math
import threading

import numpy as np
import pytest
import torch

from mrlhf.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATORS_NEED_CRITIC,
    GROUP_ESTIMATORS,
    RewardNormalizer,
    compute_advantages,
    discounted_returns,
    gae,
    grpo_advantages,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    rloo_advantages,
)
from mrlhf.rl.ema import ema_update
from mrlhf.rl.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
)
from mrlhf.rl.policy_losses import LOSS_AGGREGATIONS, aggregate, policy_loss, value_loss


def _f(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def close(a, b, tol=1e-6):
    return abs(_f(a) - _f(b)) <= tol


def allclose(t, want, tol=1e-6):
    got = torch.as_tensor(t.detach() if isinstance(t, torch.Tensor) else t, dtype=torch.float64).flatten().tolist()
    want = torch.as_tensor(want, dtype=torch.float64).flatten().tolist()
    return len(got) == len(want) and all(abs(g - w) <= tol for g, w in zip(got, want))


def py_mean_var(xs):
    mu = sum(xs) / len(xs)
    return mu, sum((x - mu) ** 2 for x in xs) / len(xs)


# ----------------------------------------------------------------------------------------------- simulated DP reduce


class ThreadSumReduce:
    """``world`` ranks as threads: reduce(t) sums t in place over ranks (an honest all-reduce stand-in)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=10)
        self.slots: list = [None] * world
        self.calls = [0] * world

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            assert t.dtype == torch.float64, "stats must be packed in float64"
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # everyone has read before any slot is overwritten
            t.copy_(total)
            return t

        return reduce

    def run(self, fn, shards):
        """fn(shard, reduce) on each rank in its own thread; returns the per-rank results."""
        out, errors = [None] * self.world, []

        def body(rank):
            try:
                out[rank] = fn(shards[rank], self.for_rank(rank))
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return out


# ------------------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # log(pi/ref) = [0.5, -1.0]
    assert allclose(kl_k1(logp, ref), [0.5, -1.0])
    assert allclose(kl_k2(logp, ref), [0.125, 0.5])
    # k3 with x = ref - logp = [-0.5, 1.0]: e^x - x - 1
    want3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert allclose(kl_k3(logp, ref), want3)
    for name, want in (("k1", [0.5, -1.0]), ("k2", [0.125, 0.5]), ("k3", want3)):
        assert allclose(kl_penalty(name, logp, ref), want)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_kl_penalty_clamps():
    logp, ref = torch.tensor([[-1.0, -30.0]]), torch.tensor([[-30.0, -1.0]])
    # raw log ratio = [29, -29] -> clamped to [5, -5]
    assert allclose(kl_penalty("k1", logp, ref, log_ratio_clamp=5.0), [5.0, -5.0])
    assert allclose(kl_penalty("k2", logp, ref, log_ratio_clamp=5.0), [12.5, 12.5])
    # k3 with x = ref - logp clamped: [-5, 5] -> e^-5 + 4, e^5 - 6 = 142.41 -> capped at 10
    k3 = kl_penalty("k3", logp, ref, log_ratio_clamp=5.0, k3_max=10.0)
    assert allclose(k3, [math.exp(-5.0) + 4.0, 10.0], tol=1e-5)
    k3_nocap = kl_penalty("k3", logp, ref, log_ratio_clamp=5.0, k3_max=None)
    assert close(k3_nocap[0, 1], math.exp(5.0) - 6.0, tol=1e-3)
    assert allclose(kl_penalty("k1", logp, ref, log_ratio_clamp=None), [29.0, -29.0])
    # defaults: clamp 20, k3 cap 10
    assert allclose(kl_penalty("k1", logp, ref), [20.0, -20.0])
    assert close(kl_penalty("k3", logp, ref)[0, 1], 10.0)


def test_kl_penalty_unknown_name():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty("k4", x, x)


def test_fixed_kl_controller():
    c = build_kl_controller("fixed", 0.05)
    assert isinstance(c, FixedKLController)
    c.update(100.0, 1000)
    assert c.value == 0.05
    d = FixedKLController(0.3)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_adaptive_kl_controller_hand_values():
    c = build_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    assert isinstance(c, AdaptiveKLController)
    c.update(9.0, 1000)  # err = clip(9/6 - 1 = 0.5) = 0.2; 0.1 * (1 + 0.2 * 0.1) = 0.102
    assert close(c.value, 0.102, 1e-12)
    c.update(3.0, 1000)  # err = clip(-0.5) = -0.2; 0.102 * (1 - 0.02) = 0.09996
    assert close(c.value, 0.09996, 1e-12)
    c.update(6.6, 500)  # err = 0.1 (unclipped); 0.09996 * (1 + 0.1 * 0.05) = 0.1004598
    assert close(c.value, 0.1004598, 1e-12)
    d = AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(c.state_dict())
    assert (d.value, d.target, d.horizon) == (c.value, 6.0, 10000)
    d.update(12.0, 10000)  # err 0.2 over a full horizon: * 1.2
    assert close(d.value, 0.1004598 * 1.2, 1e-12)


def test_build_kl_controller_errors():
    with pytest.raises(ValueError, match="target > 0"):
        build_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="target > 0"):
        build_kl_controller("adaptive", 0.1, target=0.0)
    with pytest.raises(ValueError, match="unknown KL controller"):
        build_kl_controller("pid", 0.1)


# ------------------------------------------------------------------------------------------------ masked statistics

X = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -7.0, 5.0, 6.0], [8.0, 8.0, 8.0, 8.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
X_MASKED = [1.0, 2.0, 3.0, 5.0, 6.0]  # mean 3.4, var (5.76+1.96+0.16+2.56+6.76)/5 = 3.44


def test_masked_sum_mean_var_hand_values():
    assert close(masked_sum(X, M), 17.0)
    assert close(masked_mean(X, M), 3.4)
    assert close(masked_mean(X, M.bool()), 3.4)
    assert allclose(masked_mean(X, M, dim=-1), [2.0, 5.5, 0.0])  # empty row -> 0, not NaN
    assert close(masked_var(X, M), 3.44, 1e-5)
    assert close(masked_mean(X, torch.zeros_like(M)), 0.0)
    assert close(masked_var(X, torch.zeros_like(M)), 0.0)


def test_masked_whiten_hand_values_and_zero_outside():
    mu, var = py_mean_var(X_MASKED)
    sd = math.sqrt(var + 1e-8)
    w = masked_whiten(X, M)
    want = [[(1 - mu) / sd, (2 - mu) / sd, (3 - mu) / sd, 0], [0, 0, (5 - mu) / sd, (6 - mu) / sd], [0, 0, 0, 0]]
    assert allclose(w, want, 1e-5)
    assert (w[M == 0] == 0).all()
    w2 = masked_whiten(X, M, shift_mean=False)
    want2 = [[v + mu if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(want, M.tolist())]
    assert allclose(w2, want2, 1e-5)
    empty = masked_whiten(X, torch.zeros_like(M))
    assert not empty.isnan().any() and (empty == 0).all()


def test_masked_mean_var_whiten_sharded_over_two_ranks():
    xs = [X[:1], X[1:]]
    ms = [M[:1], M[1:]]
    r = ThreadSumReduce(2)
    means = r.run(lambda s, red: masked_mean(s[0], s[1], reduce=red), list(zip(xs, ms)))
    assert all(close(m, 3.4) for m in means)
    assert r.calls == [1, 1]  # sum and count travel together
    r = ThreadSumReduce(2)
    vars_ = r.run(lambda s, red: masked_var(s[0], s[1], reduce=red), list(zip(xs, ms)))
    assert all(close(v, 3.44, 1e-5) for v in vars_)
    r = ThreadSumReduce(2)
    whites = r.run(lambda s, red: masked_whiten(s[0], s[1], reduce=red), list(zip(xs, ms)))
    assert r.calls[0] == r.calls[1]
    mu, var = py_mean_var(X_MASKED)
    sd = math.sqrt(var + 1e-8)
    assert allclose(whites[0], [(1 - mu) / sd, (2 - mu) / sd, (3 - mu) / sd, 0], 1e-5)
    assert allclose(whites[1], [0, 0, (5 - mu) / sd, (6 - mu) / sd, 0, 0, 0, 0], 1e-5)
    # without reduce each shard would use its own stats: rank 0 alone has mean 2, not 3.4
    assert not allclose(masked_whiten(xs[0], ms[0]), whites[0], 1e-3)


def test_masked_mean_reduce_keeps_local_gradient():
    # global mean over 5 tokens: d/dx of this rank's share is mask / 5
    def fn(shard, red):
        x = shard[0].clone().requires_grad_(True)
        masked_mean(x, shard[1], reduce=red).backward()
        return x.grad

    grads = ThreadSumReduce(2).run(fn, [(X[:1], M[:1]), (X[1:], M[1:])])
    assert allclose(grads[0], [0.2, 0.2, 0.2, 0.0])
    assert allclose(grads[1], [0, 0, 0.2, 0.2, 0, 0, 0, 0])


# ------------------------------------------------------------------------------------------------ rewards and GAE


def test_kl_shaped_rewards():
    scores = torch.tensor([2.0, 5.0, 3.0])
    kl = torch.tensor([[9.0, 0.5, 1.0, 7.0], [0.2, 0.4, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    want = [[0, -0.05, -0.1 + 2.0, 0], [-0.02, -0.04 + 5.0, 0, 0], [0, 0, 0, 0]]  # empty row: no score
    assert allclose(out, want)


def test_gae_hand_case_and_garbage_outside_mask():
    g, lam = 0.9, 0.8
    r1, r2, r3 = 0.1, -0.2, 1.5
    v1, v2, v3 = 0.3, 0.5, 0.4
    # prompt token at 0, actions at 1..3, padding at 4: values/rewards there are garbage
    rewards = torch.tensor([[123.0, r1, r2, r3, -55.0]])
    values = torch.tensor([[1e6, v1, v2, v3, -3e5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    d3 = r3 - v3  # terminal: no bootstrap
    a3 = d3
    d2 = r2 + g * v3 - v2
    a2 = d2 + g * lam * a3
    d1 = r1 + g * v2 - v1
    a1 = d1 + g * lam * a2
    adv, ret = gae(rewards, values, mask, g, lam)
    assert allclose(adv, [0, a1, a2, a3, 0], 1e-6)
    assert allclose(ret, [0, a1 + v1, a2 + v2, a3 + v3, 0], 1e-6)


def test_gae_gamma_lambda_one_is_return_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.5, -1.0, 2.0, 0.25, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[7.0, 0.1, 0.2, -0.3, 0.4, 8.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    want = [0.0] * 6
    for t in range(1, 5):
        want[t] = sum(rewards[0, k].item() for k in range(t, 5)) - values[0, t].item()
    assert allclose(adv[0], want)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()
    assert not adv.requires_grad


def test_gae_no_grad():
    values = torch.tensor([[0.5, 0.5]], requires_grad=True)
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), values, torch.tensor([[1.0, 1.0]]), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


def test_discounted_returns():
    rewards = torch.tensor([[5.0, 1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    out = discounted_returns(rewards, mask, 0.5)
    # t=3: 3; t=2: 2 + 0.5*3 = 3.5; t=1: 1 + 0.5*3.5 = 2.75
    assert allclose(out, [[0, 2.75, 3.5, 3.0, 0], [0, 0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------------- GRPO / RLOO


def test_grpo_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = grpo_advantages(scores, 3, eps=0.0)
    # group 1: mean 2, unbiased std = sqrt((1 + 0 + 1) / 2) = 1; group 2: all equal -> exactly 0
    assert allclose(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert (adv[3:] == 0).all()
    adv_eps = grpo_advantages(scores, 3, eps=1.0)
    assert allclose(adv_eps, [-0.5, 0.0, 0.5, 0, 0, 0])
    dr = grpo_advantages(torch.tensor([0.0, 4.0, 1.0, 1.0]), 2, scale_by_std=False)
    assert allclose(dr, [-2.0, 2.0, 0.0, 0.0])
    # an equal group whose float32 mean is inexact (mean of eight 0.1s != 0.1) must still be exactly 0
    assert (grpo_advantages(torch.full((8,), 0.1), 8) == 0).all()
    assert (grpo_advantages(torch.full((8,), 0.1), 8, scale_by_std=False) == 0).all()


def test_group_size_validation():
    s = torch.zeros(6)
    for fn in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="group_size >= 2"):
            fn(s, 1)
        with pytest.raises(ValueError, match="multiple of group_size"):
            fn(s, 4)


def test_rloo_hand_values():
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0]), 3)
    # 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5; equal group -> 0
    assert allclose(adv, [-3.0, -1.5, 4.5, 0, 0, 0])
    assert (rloo_advantages(torch.full((8,), 0.1), 8) == 0).all()  # inexact in float32 without the equal-group rule


# ------------------------------------------------------------------------------------------------ compute_advantages

SCORES = torch.tensor([1.0, 3.0])
KL_R = torch.tensor([[9.0, -0.1, -0.2, 9.0], [9.0, 9.0, -0.3, 9.0]])  # garbage (9) off the mask
AMASK = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
VALUES = torch.tensor([[5.0, 0.5, 0.25, 5.0], [5.0, 5.0, 1.0, 5.0]])
# token rewards: row 0 -> [0, -0.1, 0.8, 0]; row 1 -> [0, 0, 2.7, 0]


def test_registries():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce++"}
    assert ESTIMATORS_NEED_CRITIC == {"gae"} and GROUP_ESTIMATORS == {"grpo", "rloo"}
    assert set(LOSS_AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


def test_compute_advantages_gae():
    adv, ret = compute_advantages("gae", SCORES, KL_R, AMASK, VALUES, gamma=1.0, lam=1.0, whiten=False)
    # gamma = lam = 1: A_t = sum of future rewards - V_t
    a = [(-0.1 + 0.8) - 0.5, 0.8 - 0.25, 2.7 - 1.0]
    assert allclose(adv, [[0, a[0], a[1], 0], [0, 0, a[2], 0]])
    assert allclose(ret, [[0, 0.7, 0.8, 0], [0, 0, 2.7, 0]])
    adv_w, ret_w = compute_advantages("gae", SCORES, KL_R, AMASK, VALUES, gamma=1.0, lam=1.0)
    mu, var = py_mean_var(a)
    w = [(x - mu) / math.sqrt(var + 1e-8) for x in a]
    assert allclose(adv_w, [[0, w[0], w[1], 0], [0, 0, w[2], 0]], 1e-5)
    assert allclose(ret_w, ret)  # returns are never whitened
    with pytest.raises(ValueError, match="gae needs the critic's values"):
        compute_advantages("gae", SCORES, KL_R, AMASK)


def test_compute_advantages_reinforce_pp():
    adv, ret = compute_advantages("reinforce++", SCORES, KL_R, AMASK, gamma=0.5, whiten=False)
    assert ret is None
    g = [-0.1 + 0.5 * 0.8, 0.8, 2.7]  # returns-to-go with gamma 0.5
    mu, var = py_mean_var(g)
    w = [(x - mu) / math.sqrt(var + 1e-8) for x in g]  # always whitened
    assert allclose(adv, [[0, w[0], w[1], 0], [0, 0, w[2], 0]], 1e-5)


def test_compute_advantages_grpo_and_rloo():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    kl_r = torch.tensor([[-0.5, -0.5], [0.0, 9.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]])
    # seq scores: 1 - 1 = 0, 3 + 0 = 3 (9 is off-mask); group 2 equal -> 0
    adv, ret = compute_advantages("grpo", scores, kl_r, mask, group_size=2, eps=0.0)
    assert ret is None
    s = math.sqrt(4.5)  # unbiased std of [0, 3]
    assert allclose(adv, [[-1.5 / s, -1.5 / s], [1.5 / s, 0], [0, 0], [0, 0]])
    adv_dr, _ = compute_advantages("grpo", scores, kl_r, mask, group_size=2, scale_by_std=False)
    assert allclose(adv_dr, [[-1.5, -1.5], [1.5, 0], [0, 0], [0, 0]])
    adv_r, ret_r = compute_advantages("rloo", scores, kl_r, mask, group_size=2)
    assert ret_r is None
    assert allclose(adv_r, [[-3.0, -3.0], [3.0, 0], [0, 0], [0, 0]])
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages("grpo", scores, kl_r, mask)  # default group_size 1


def test_compute_advantages_unknown():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("vtrace", SCORES, KL_R, AMASK, VALUES)


# -------------------------------------------------------------------------------------------------- reward normalizer


def test_reward_normalizer_init_normalize_and_clip():
    n = RewardNormalizer(mean=1.0, std=2.0, count=10.0, clip=1.0, update=False)
    assert (n.mean, n.std, n.count) == (1.0, 2.0, 10.0)
    assert allclose(n.normalize(torch.tensor([2.0, 1.0, 9.0, -9.0])), [0.5, 0.0, 1.0, -1.0])
    n.update(torch.tensor([100.0, 200.0]))  # update=False: no change
    assert (n.mean, n.std, n.count) == (1.0, 2.0, 10.0)
    assert allclose(RewardNormalizer(std=0.0).normalize(torch.tensor([1e-8])), [1.0])  # std floored at eps


def test_reward_normalizer_update_matches_numpy_on_concatenation():
    old = np.array([0.5, 1.5, 2.0, -1.0, 3.0])
    new1, new2 = np.array([4.0, 5.0, -2.0]), np.array([10.0, 0.0])
    n = RewardNormalizer(mean=old.mean(), std=old.std(), count=len(old))
    n.update(torch.tensor(new1, dtype=torch.float32))
    n.update(torch.tensor(new2, dtype=torch.float32))
    allv = np.concatenate([old, new1, new2])
    assert close(n.mean, allv.mean(), 1e-9) and close(n.std, allv.std(), 1e-9) and n.count == 10
    m = RewardNormalizer(mean=7.0, std=3.0, count=0)  # no prior weight
    assert m.std == 3.0
    m.update(torch.tensor(new1))
    assert close(m.mean, new1.mean(), 1e-9) and close(m.std, new1.std(), 1e-9)


def test_reward_normalizer_sharded_update():
    old = np.array([1.0, 2.0, 4.0])
    shards = [torch.tensor([3.0, -1.0, 8.0]), torch.tensor([0.5])]
    r = ThreadSumReduce(2)

    def fn(shard, red):
        n = RewardNormalizer(mean=old.mean(), std=old.std(), count=3)
        n.update(shard, reduce=red)
        return n

    out = r.run(fn, shards)
    assert r.calls == [1, 1]
    allv = np.concatenate([old, shards[0].numpy(), shards[1].numpy()])
    for n in out:
        assert close(n.mean, allv.mean(), 1e-9) and close(n.std, allv.std(), 1e-9) and n.count == 7


def test_reward_normalizer_state_dict_round_trip():
    n = RewardNormalizer(mean=0.5, std=1.5, count=4)
    n.update(torch.tensor([3.0, -2.0, 0.0]))
    sd = n.state_dict()
    assert all(type(v) is float for v in sd.values())
    m = RewardNormalizer()
    m.load_state_dict(sd)
    assert (m.mean, m.std, m.count) == (n.mean, n.std, n.count)
    x = torch.tensor([10.0, 11.0])
    n.update(x)
    m.update(x)
    assert (m.mean, m.std, m.count) == (n.mean, n.std, n.count)


# ----------------------------------------------------------------------------------------------------- PPO losses


def test_policy_loss_clip_cases_and_gradients():
    # per token: (log ratio, advantage)
    cases = [(0.1, 1.0), (0.5, 1.0), (-0.5, 1.0), (-0.5, -1.0), (0.5, -1.0)]
    old = torch.tensor([[-1.0] * 5])
    logp = (old + torch.tensor([[c[0] for c in cases]])).requires_grad_(True)
    adv = torch.tensor([[c[1] for c in cases]])
    loss, clipped, kl = policy_loss(logp, old, adv, 0.2, 0.2)
    e = math.exp
    want = [
        -e(0.1),  # inside the clip range
        -1.2,  # A>0, ratio 1.65 > 1.2: clipped
        -e(-0.5),  # A>0, ratio 0.61 < 0.8: pessimistic min keeps the unclipped term
        0.8,  # A<0, ratio 0.61 < 0.8: clipped
        e(0.5),  # A<0, ratio 1.65 > 1.2: unclipped
    ]
    assert allclose(loss, want)
    assert clipped.tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]
    assert allclose(kl, [e(x) - 1 - x for x, _ in cases])
    loss.sum().backward()
    # d/dlogp of -A * ratio is -A * ratio; clipped tokens have zero gradient
    assert allclose(logp.grad, [-e(0.1), 0.0, -e(-0.5), 0.0, e(0.5)])


def test_policy_loss_asymmetric_clip_and_dual_clip():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, 1.5, 1.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, clipped, _ = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    assert close(loss[0, 0], -math.exp(0.2))  # 1.22 < 1.28: not clipped with clip-higher
    assert clipped[0, 0] == 0
    loss_sym, clipped_sym, _ = policy_loss(logp, old, adv)
    assert close(loss_sym[0, 0], -1.2) and clipped_sym[0, 0] == 1
    dual, _, _ = policy_loss(logp, old, adv, dual_clip=3.0)
    # A<0 with ratio e^1.5 = 4.48: min(4.48, 3 * 1) = 3; A>0 token untouched (clipped at -1.2)
    assert allclose(dual, [-1.2, 3.0, -1.2])
    dual.sum().backward()
    assert allclose(logp.grad, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, dual_clip=1.0)


def test_policy_loss_gradient_only_through_logp():
    old = torch.zeros(1, 1, requires_grad=True)
    adv = torch.ones(1, 1, requires_grad=True)
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, _, kl = policy_loss(logp, old, adv)
    loss.sum().backward()
    assert old.grad is None and adv.grad is None and close(logp.grad, -1.0)
    assert not kl.requires_grad


def test_value_loss():
    values = torch.tensor([[1.0, 1.0, 0.1]], requires_grad=True)
    old = torch.tensor([[0.0, 0.9, 0.0]])
    ret = torch.tensor([[2.0, 0.0, 0.0]])
    loss, clipped = value_loss(values, old, ret, 0.2)
    # tok0: unclipped (1-2)^2 = 1, v_clip 0.2 -> (0.2-2)^2 = 3.24 -> 0.5*3.24, clipped
    # tok1: (1-0)^2 = 1, v_clip 1.0 (inside) -> 1 -> 0.5
    # tok2: (0.1)^2 = 0.01, v_clip 0.1 -> 0.005, not clipped
    assert allclose(loss, [1.62, 0.5, 0.005])
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]
    loss.sum().backward()
    assert allclose(values.grad, [0.0, 1.0, 0.1])  # clipped token: no gradient
    plain, none_clipped = value_loss(values, old, ret, None)
    assert allclose(plain, [0.5, 0.5, 0.005]) and (none_clipped == 0).all()


# ---------------------------------------------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
LMASK = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)


def test_aggregate_modes_hand_values():
    # masked tokens: 1, 2 | 6, 7, 8 | none -> 5 tokens, sum 24; 3 sequences
    assert close(aggregate(LOSS, LMASK, "token-mean", 5, 3), 24 / 5)
    assert close(aggregate(LOSS, LMASK, "seq-mean-token-mean", 5, 3), (1.5 + 7.0 + 0.0) / 3)
    assert close(aggregate(LOSS, LMASK, "seq-mean-token-sum-norm", 5, 3, constant=4), 24 / (3 * 4))
    assert close(aggregate(LOSS, torch.zeros_like(LMASK), "token-mean", 0, 0), 0.0)  # counts clamped to 1
    with pytest.raises(ValueError, match="constant"):
        aggregate(LOSS, LMASK, "seq-mean-token-sum-norm", 5, 3)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(LOSS, LMASK, "sum", 5, 3)


def test_aggregate_splits_sum_to_whole():
    loss = LOSS.clone()
    loss[0, 2] = float("inf")  # off-mask garbage must not leak
    for mode in LOSS_AGGREGATIONS:
        whole = aggregate(loss, LMASK, mode, 5, 3, constant=4)
        parts = aggregate(loss[:1], LMASK[:1], mode, 5, 3, constant=4) + aggregate(
            loss[1:], LMASK[1:], mode, 5, 3, constant=4
        )
        assert torch.isfinite(whole) and close(whole, parts), mode
    # the per-microbatch local mean would be wrong: 1.5 + 7 != 24 / 5
    assert not close(
        aggregate(loss[:1], LMASK[:1], "token-mean", 2, 1) + aggregate(loss[1:], LMASK[1:], "token-mean", 3, 2),
        24 / 5,
    )


# --------------------------------------------------------------------------------------------------------------- EMA


def test_ema_update_hand_values():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.tensor([3.0, 0.0]), torch.tensor([[10.0]], requires_grad=True)]
    ema_update(ema, params, 0.9)
    assert allclose(ema[0], [1.2, 1.8]) and allclose(ema[1], [1.0])  # 0.9 * e + 0.1 * p
    assert not ema[1].requires_grad
    ema_update(ema, params, 0.0)  # decay 0 copies
    assert allclose(ema[0], [3.0, 0.0]) and allclose(ema[1], [10.0])
    bf = [torch.tensor([1.0], dtype=torch.bfloat16)]
    ema_update(bf, [torch.tensor([2.0])], 0.5)
    assert bf[0].dtype == torch.bfloat16 and bf[0].item() == 1.5


def test_ema_update_errors():
    a = [torch.zeros(2)]
    for decay in (1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            ema_update(a, a, decay)
    with pytest.raises(ValueError, match="tensors"):
        ema_update(a, a + a, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update(a, [torch.zeros(3)], 0.5)


def test_overlong_penalty_ramps_over_the_buffer() -> None:
    """max 10 tokens, buffer 4, penalty 2: no penalty up to 6 tokens, then (L - 6) / 4 * 2: 7 -> 0.5, 8 -> 1.0,
    10 -> 2.0 (DAPO's soft overlong punishment, whose last step is the truncation itself)."""
    from mrlhf.rl.advantages import overlong_penalty

    got = overlong_penalty(torch.tensor([1, 6, 7, 8, 10]), max_len=10, buffer=4, penalty=2.0)
    assert got.tolist() == [0.0, 0.0, 0.5, 1.0, 2.0]
