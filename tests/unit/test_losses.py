"""RL losses against hand-computed values."""

import math

import pytest
import torch

from mrlhf.rl.losses import dpo_loss, implicit_rewards, pairwise_rm_loss, sequence_logprob


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol


def test_pairwise_rm_loss_hand_values():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    loss = pairwise_rm_loss(c, r)
    assert close(loss[0], math.log1p(math.exp(-1.0)))  # -log sigmoid(1)
    assert close(loss[1], math.log1p(math.exp(0.5)))  # -log sigmoid(-0.5)
    with_margin = pairwise_rm_loss(c, r, margin=torch.tensor([0.5, 0.0]))
    assert close(with_margin[0], math.log1p(math.exp(-0.5)))
    centered = pairwise_rm_loss(c, r, center_coef=0.1)
    assert close(centered[0], math.log1p(math.exp(-1.0)) + 0.1 * 9.0)
    assert close(centered[1], math.log1p(math.exp(0.5)) + 0.1 * 0.25)


def test_pairwise_rm_loss_gradient_pushes_chosen_up():
    c = torch.tensor([0.0], requires_grad=True)
    r = torch.tensor([0.0], requires_grad=True)
    pairwise_rm_loss(c, r).sum().backward()
    assert close(c.grad, -0.5) and close(r.grad, 0.5)


def test_sequence_logprob_sums_masked_tokens():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert sequence_logprob(lp, mask).tolist() == [-5.0, -1.0]


def test_dpo_sigmoid_ipo_and_cdpo_hand_values():
    pi_c, pi_r, ref_c, ref_r = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    # log-ratio difference: (-1 - -2) - (-3 - -2.5) = 1 + 0.5 = 1.5
    beta = 0.2
    z = beta * 1.5
    assert close(dpo_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, beta), math.log1p(math.exp(-z)))
    eps = 0.1
    want = (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
    assert close(dpo_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, beta, eps), want)
    assert close(dpo_loss("ipo", pi_c, pi_r, ref_c, ref_r, beta), (1.5 - 1 / (2 * beta)) ** 2)
    r_c, r_r = implicit_rewards(pi_c, pi_r, ref_c, ref_r, beta)
    assert close(r_c, 0.2) and close(r_r, -0.1)


def test_dpo_is_log2_at_the_reference():
    x = torch.tensor([-4.0, -7.0])
    assert torch.allclose(dpo_loss("sigmoid", x, x - 1, x, x - 1, 0.5), torch.full((2,), math.log(2.0)))


def test_unknown_dpo_loss():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss("kto", x, x, x, x, 0.1)
