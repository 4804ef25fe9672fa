"""GSPO's sequence-level ratio (``ppo.importance_sampling_level=sequence``) against hand-computed values: the ratio
is the geometric mean of the row's token ratios over its mask, clipped as one, and its gradient reaches each token
with weight 1/|y|; one-token rows and on-policy rows equal the token-level loss."""

import math

import pytest
import torch

from mrlhf.config import load_config
from mrlhf.errors import ConfigError
from mrlhf.rl.policy_losses import aggregate, policy_loss

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.2, -9.0, -9.0]], dtype=torch.float64)
NEW = torch.tensor([[-0.9, -2.1, -0.3, 5.0], [-1.4, -0.1, 3.0, 3.0]], dtype=torch.float64)  # padding moves wildly
ADV = torch.tensor([[1.0] * 4, [-2.0] * 4], dtype=torch.float64)


def test_sequence_ratio_and_loss_by_hand():
    loss, clipped, kl = policy_loss(NEW, OLD, ADV, 0.2, 0.2, None, "sequence", MASK)
    r0 = math.exp((0.1 - 0.1 + 0.2) / 3)  # row 0: mean log-ratio over its 3 tokens (the padding is left out)
    r1 = math.exp((0.1 + 0.1) / 2)
    assert torch.allclose(loss[0, :3], torch.full((3,), -1.0 * min(r0, 1.2), dtype=torch.float64))
    # negative advantage: max(2 r, 2 clip(r)) = 2 * max(r, clamp(r)) with r inside the range
    assert torch.allclose(loss[1, :2], torch.full((2,), 2.0 * r1, dtype=torch.float64))
    assert clipped.sum() == 0  # both ratios within 1 +- 0.2
    # approx_kl stays per token: (r_t - 1) - log r_t of each token's own ratio
    t = 0.2
    assert math.isclose(float(kl[0, 2]), math.exp(t) - 1 - t, rel_tol=1e-12)


def test_sequence_clipping_is_per_row_and_the_gradient_is_one_over_length():
    logp = NEW.clone().requires_grad_(True)
    loss, clipped, _ = policy_loss(logp, OLD, ADV, 0.01, 0.01, None, "sequence", MASK)
    # row 0: r0 = exp(0.2/3) = 1.069 > 1.01 with A > 0 -> clipped for the whole row, no gradient
    assert clipped[0, :3].tolist() == [1.0, 1.0, 1.0]
    # row 1: r1 = exp(0.1) = 1.105, A < 0: max(2 r, 2 * 1.01) = 2 r, unclipped. Token-mean over N = 5 tokens: the
    # row adds |y| * 2 r / N, and dr/dlogp_t = r / |y|, so each of its tokens gets 2 r / N (= -A r / N)
    assert clipped[1, :2].tolist() == [0.0, 0.0]
    total = aggregate(loss, MASK, "token-mean", 5.0, 2.0, None)
    total.backward()
    r1 = math.exp(0.1)
    assert torch.all(logp.grad[0] == 0)
    assert torch.allclose(logp.grad[1, :2], torch.full((2,), 2.0 * r1 / 5.0, dtype=torch.float64))
    assert torch.all(logp.grad[1, 2:] == 0)  # padding gets nothing


def test_one_token_rows_and_on_policy_rows_equal_the_token_level_loss():
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    new = torch.tensor([[-0.7, -1.0], [-2.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-0.9, -5.0], [-1.5, -5.0]], dtype=torch.float64)
    adv = torch.tensor([[0.5, 0.5], [-1.0, -1.0]], dtype=torch.float64)
    seq = policy_loss(new, old, adv, 0.2, 0.28, None, "sequence", mask)
    tok = policy_loss(new, old, adv, 0.2, 0.28, None, "token", mask)
    for a, b in zip(seq, tok):
        assert torch.allclose(a * mask, b * mask)
    loss, clipped, kl = policy_loss(OLD, OLD, ADV, 3e-4, 4e-4, None, "sequence", MASK)  # on-policy: ratio 1
    assert torch.equal(loss * MASK, -ADV * MASK) and clipped.sum() == 0 and torch.all(kl == 0)


def test_bad_level_and_missing_mask_are_errors():
    with pytest.raises(ValueError, match="importance sampling level"):
        policy_loss(NEW, OLD, ADV, level="sentence")
    with pytest.raises(ValueError, match="needs the mask"):
        policy_loss(NEW, OLD, ADV, level="sequence")
    yaml = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "ppo_demo.yaml")
    with pytest.raises(ConfigError, match="ppo.importance_sampling_level must be token or sequence"):
        load_config(yaml, ["ppo.importance_sampling_level=sentence"])
    assert load_config(yaml, ["ppo.importance_sampling_level=sequence"]).ppo.importance_sampling_level == "sequence"
