"""``rl.make_experience.shape`` on one CPU process: the truncation policy, reward clipping and non-finite rewards.

Each case builds a tiny rollout with ``build_rollout`` (one-token prompts, 4 positions), sets the scoring fields by
hand (old = ref log-probs, so the KL term is exactly 0) and runs ``shape`` with ``reduce`` as one process sees it
(the in-place sum over one rank is the identity). Expected scores, masks and advantages are written out by hand:
RLOO over a group of two is ``a_i = s_i - s_other``; Dr. GRPO (``group_scale_by_std=false``) is ``s_i - group mean``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mrlhf.config import RunConfig, load_config
from mrlhf.errors import ConfigError
from mrlhf.rl.advantages import RewardNormalizer
from mrlhf.rl.experience import Experience, build_rollout
from mrlhf.rl.make_experience import shape

PPO_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "ppo_demo.yaml")
EOS, PAD = 2, 0
NAN, INF = float("nan"), float("inf")


def one_process_reduce(t: torch.Tensor) -> torch.Tensor:
    """``comm.all_reduce_dp`` on a single rank: the sum over one rank leaves ``t`` as it is."""
    return t


@pytest.fixture(autouse=True)
def _no_fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MRLHF_FAULT_NAN_REWARD", raising=False)  # shape() would turn listed rows' scores into NaN


def config(*overrides: str) -> RunConfig:
    return load_config(PPO_YAML, ["ppo.reward_normalize=false", "ppo.reward_clip=null", *overrides])


def rollout(responses: list[list[int]], truncated: list[bool], n_samples: int, raw: list[float]) -> Experience:
    """Rows of prompt [5] + response, width 4; old = ref log-probs = 0 on the actions (no KL); ``raw`` scores."""
    b = len(responses)
    exp = build_rollout(
        [[5]] * b, responses, [[-0.5] * len(r) for r in responses], truncated,
        seq_ids=list(range(b)), prompt_index=[i // n_samples for i in range(b)],
        width=4, pad_id=PAD, device=torch.device("cpu"),
    )  # fmt: skip
    exp.old_logprobs = torch.zeros(b, 4)
    exp.ref_logprobs = torch.zeros(b, 4)
    exp.raw_scores = torch.tensor(raw)
    return exp


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Two samples of one prompt: row 0 ends with EOS after 2 tokens, row 1 hits the 3-token budget without EOS.
# Prompt [5] has one token, so the actions sit on label positions 0.. (position t is scored on token t+1).
PAIR_RESPONSES = [[7, EOS], [7, 8, 9]]
PAIR_TRUNCATED = [False, True]
PAIR_ACTIONS = rows([1, 1, 0, 0], [1, 1, 1, 0])


def test_pair_rollout_layout() -> None:
    """The fixture the truncation cases share: tokens, actions and the truncation flag as written above."""
    exp = rollout(PAIR_RESPONSES, PAIR_TRUNCATED, 2, [1.0, 3.0])
    assert exp.tokens.tolist() == [[5, 7, EOS, PAD], [5, 7, 8, 9]]
    assert torch.equal(exp.action_mask, PAIR_ACTIONS)
    assert exp.truncated.tolist() == [False, True]


# ppo.truncation -> (scores, loss_mask, advantages); raw scores 1.0 (row 0) and 3.0 (row 1, truncated), penalty 0.5.
#   keep:    scores [1, 3];       RLOO a = [1 - 3, 3 - 1] = [-2, 2]
#   penalty: scores [1, 3 - 0.5]; RLOO a = [1 - 2.5, 2.5 - 1] = [-1.5, 1.5]
#   mask:    scores [1, 3];       RLOO a = [-2, 2], but row 1 leaves the actor loss: its loss mask and advantages are 0
TRUNCATION_CASES = {
    "keep": ([1.0, 3.0], PAIR_ACTIONS, rows([-2, -2, 0, 0], [2, 2, 2, 0])),
    "penalty": ([1.0, 2.5], PAIR_ACTIONS, rows([-1.5, -1.5, 0, 0], [1.5, 1.5, 1.5, 0])),
    "mask": ([1.0, 3.0], rows([1, 1, 0, 0], [0, 0, 0, 0]), rows([-2, -2, 0, 0], [0, 0, 0, 0])),
}


@pytest.mark.parametrize("policy", sorted(TRUNCATION_CASES))
def test_truncation_policy(policy: str) -> None:
    scores, loss_mask, advantages = TRUNCATION_CASES[policy]
    cfg = config("ppo.estimator=rloo", f"ppo.truncation={policy}", "ppo.truncation_penalty=0.5")
    exp = rollout(PAIR_RESPONSES, PAIR_TRUNCATED, 2, [1.0, 3.0])
    shape(exp, cfg, 0.05, RewardNormalizer(), one_process_reduce)
    assert exp.scores.tolist() == scores
    assert exp.raw_scores.tolist() == [1.0, 3.0]  # the policy changes the score, not the model's raw score
    assert exp.valid.tolist() == [True, True]
    assert torch.equal(exp.loss_mask, loss_mask)
    assert torch.equal(exp.critic_mask, PAIR_ACTIONS)  # every policy keeps truncated rows in the value loss
    assert torch.equal(exp.kl, torch.zeros(2, 4))
    assert torch.allclose(exp.advantages, advantages, rtol=0, atol=1e-6)


def test_overlong_penalty_reaches_the_responses_near_the_budget() -> None:
    """truncation=overlong, max_new_tokens 3, buffer 2, penalty 0.5: the ramp starts after 3 - 2 = 1 token; row 0
    (2 tokens, ended) loses 0.5 * (2 - 1) / 2 = 0.25, row 1 (3 tokens, truncated) the full 0.5. Scores [0.75, 2.5];
    RLOO a = [0.75 - 2.5, 2.5 - 0.75] = [-1.75, 1.75]; nothing is masked."""
    cfg = config("ppo.estimator=rloo", "ppo.truncation=overlong", "ppo.overlong_buffer=2", "ppo.truncation_penalty=0.5",
                 "generation.max_new_tokens=3")  # fmt: skip
    exp = rollout(PAIR_RESPONSES, PAIR_TRUNCATED, 2, [1.0, 3.0])
    shape(exp, cfg, 0.05, RewardNormalizer(), one_process_reduce)
    assert exp.scores.tolist() == [0.75, 2.5]
    assert torch.equal(exp.loss_mask, PAIR_ACTIONS)
    assert torch.allclose(exp.advantages, rows([-1.75, -1.75, 0, 0], [1.75, 1.75, 1.75, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo.truncation=overlong"], "needs ppo.overlong_buffer >= 1"),
        (["ppo.truncation=overlong", "ppo.overlong_buffer=17"], r"overlong_buffer \(17\) must not exceed generation"),
    ],
)
def test_overlong_config_is_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(*overrides)  # ppo_demo.yaml: generation.max_new_tokens 16


def test_flat_groups_are_the_prompts_without_a_reward_signal() -> None:
    """Groups of 3: [1, 1, 1] flat; [0, 1, 0] not; [2, nan-dropped, 2] flat (its valid scores agree); [5, dropped,
    dropped] flat (one valid sample: no baseline)."""
    from mrlhf.trainers.ppo import flat_groups

    scores = torch.tensor([1.0, 1, 1, 0, 1, 0, 2, 9, 2, 5, 7, 8])
    valid = torch.tensor([True, True, True, True, True, True, True, False, True, True, False, False])
    assert flat_groups(scores, valid, 3).tolist() == [True, False, True, True]


# ppo.reward_clip without normalisation: raw scores 7 and -3 clipped to +-2; RLOO a = [2 - (-2), -2 - 2] = [4, -4].
# With reward_clip=null they pass unchanged: a = [7 - (-3), -3 - 7] = [10, -10].
@pytest.mark.parametrize(
    "clip, scores, adv",
    [("2.0", [2.0, -2.0], [4.0, -4.0]), ("null", [7.0, -3.0], [10.0, -10.0])],
)
def test_reward_clip_without_normalisation(clip: str, scores: list[float], adv: list[float]) -> None:
    cfg = config("ppo.estimator=rloo", f"ppo.reward_clip={clip}")
    exp = rollout([[7, EOS], [7, 8, EOS]], [False, False], 2, [7.0, -3.0])
    shape(exp, cfg, 0.05, RewardNormalizer(), one_process_reduce)
    assert exp.scores.tolist() == scores
    assert exp.raw_scores.tolist() == [7.0, -3.0]
    expected = rows([adv[0], adv[0], 0, 0], [adv[1], adv[1], adv[1], 0])
    assert torch.allclose(exp.advantages, expected, rtol=0, atol=1e-6)


def test_non_finite_score_drops_its_row_and_takes_its_groups_finite_mean() -> None:
    """Two prompts x 3 samples; row 0 (NaN) and row 4 (-inf) are dropped.

    Group 0: [nan, 1, 4] -> the NaN becomes mean(1, 4) = 2.5; group 1: [2, -inf, 0] -> the -inf becomes mean(2, 0) = 1.
    (The mean of all four finite scores, 1.75, or a zero-filled group mean, 5/3 and 2/3, would differ.)
    Dr. GRPO, ``s - group mean``: group 0 mean (2.5 + 1 + 4) / 3 = 2.5 -> [-, 1 - 2.5, 4 - 2.5] = [-, -1.5, 1.5];
    group 1 mean (2 + 1 + 0) / 3 = 1 -> [1, -, -1]: the same as without the dropped rows, mean(1, 4) and mean(2, 0).
    The running reward statistics see only the four finite scores [1, 4, 2, 0]: count 4, mean 1.75, population
    variance (0.75^2 + 2.25^2 + 0.25^2 + 1.75^2) / 4 = 8.75 / 4 = 2.1875.
    """
    cfg = config("ppo.estimator=grpo", "ppo.group_scale_by_std=false", "ppo.n_samples=3")
    exp = rollout([[7, EOS]] * 6, [False] * 6, 3, [NAN, 1.0, 4.0, 2.0, -INF, 0.0])
    normalizer = RewardNormalizer()
    shape(exp, cfg, 0.05, normalizer, one_process_reduce)

    assert exp.valid.tolist() == [False, True, True, True, False, True]
    assert exp.raw_scores.tolist() == [2.5, 1.0, 4.0, 2.0, 1.0, 0.0]
    assert exp.scores.tolist() == [2.5, 1.0, 4.0, 2.0, 1.0, 0.0]
    kept = rows([0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0])
    assert torch.equal(exp.loss_mask, kept)
    assert torch.equal(exp.critic_mask, kept)
    adv = rows([0, 0, 0, 0], [-1.5, -1.5, 0, 0], [1.5, 1.5, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [-1, -1, 0, 0])
    assert torch.allclose(exp.advantages, adv, rtol=0, atol=1e-6)
    assert normalizer.count == 4
    assert normalizer.mean == pytest.approx(1.75, abs=1e-12)
    assert normalizer.std == pytest.approx(math.sqrt(2.1875), abs=1e-12)


@pytest.mark.parametrize(
    "estimator, extra, want",
    [
        # RLOO, group [nan, 1, 4]: the survivors' leave-one-out baselines are each other, 1 - 4 = -3 and 4 - 1 = 3
        # (counting the filled 2.5 as a third reward would give -2.25 and 2.25)
        ("rloo", [], [0.0, -3.0, 3.0]),
        # GRPO: mean 2.5 and sample std sqrt((1.5^2 + 1.5^2) / 1) = sqrt(4.5) of the survivors: -+1.5 / sqrt(4.5)
        # = -+0.70710678 (the filled row in the std would give -+1.0)
        ("grpo", ["ppo.group_eps=1e-6"], [0.0, -1.5 / (4.5**0.5 + 1e-6), 1.5 / (4.5**0.5 + 1e-6)]),
    ],
)
def test_a_dropped_row_changes_no_group_baseline(estimator: str, extra: list[str], want: list[float]) -> None:
    """Group baselines come from the valid rows only; the second group has one valid row left: no baseline, all 0."""
    cfg = config(f"ppo.estimator={estimator}", "ppo.n_samples=3", *extra)
    exp = rollout([[7, EOS]] * 6, [False] * 6, 3, [NAN, 1.0, 4.0, NAN, INF, 5.0])
    shape(exp, cfg, 0.05, RewardNormalizer(), one_process_reduce)
    assert exp.valid.tolist() == [False, True, True, False, False, True]
    got = exp.advantages[:, 0].tolist()
    assert got[:3] == pytest.approx(want, abs=1e-6) and got[3:] == [0.0, 0.0, 0.0], got
