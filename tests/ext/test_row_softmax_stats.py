"""mrlhf::row_softmax_stats (greedy sampling's row max, argmax and sum of exponentials) against its torch twin."""

from __future__ import annotations

import pytest
import torch

from mrlhf.ops import kv_ops, reference

pytestmark = pytest.mark.skipif("cpu" not in kv_ops.EXT_DEVICES, reason=f"mrlhf._C not in use: {kv_ops.BACKEND}")

NEG_INF = float("-inf")


def check(x: torch.Tensor) -> None:
    mx, arg, se = torch.ops.mrlhf.row_softmax_stats(x)
    rmx, rarg, rse = reference.row_softmax_stats(x)
    assert mx.dtype == torch.float32 and arg.dtype == torch.long and se.dtype == torch.float32
    assert torch.equal(mx, rmx), (mx, rmx)  # a max is exact
    assert torch.equal(arg, rarg), (arg, rarg)  # lowest index of the max
    assert torch.allclose(se, rse, rtol=2e-6, atol=0), (se - rse).abs().max()


@pytest.mark.parametrize("b,v", [(1, 1), (3, 15), (2, 16), (5, 17), (4, 33), (16, 8064), (7, 1000)])
def test_matches_reference(b, v, cpu_isa):
    g = torch.Generator().manual_seed(b * 1000 + v)
    x = torch.randn(b, v, generator=g) * 4
    check(x)
    if v > 8:  # padding columns (-inf) at the end, as the vocab-parallel head writes them
        x[:, -5:] = NEG_INF
        check(x)


def test_ties_go_to_the_lowest_index(cpu_isa):
    """Equal maxima in one vector lane, in different lanes, and in the tail: the first one wins, like argmax."""
    x = torch.zeros(4, 100)
    x[0, [3, 19, 35]] = 7.0  # same lane (16 apart) and the next
    x[1, [50, 2]] = 7.0  # a later lane holds the max first in the scan
    x[2, [99, 98]] = 7.0  # masked tail
    x[3, :] = 1.0  # all equal
    check(x)
    assert torch.ops.mrlhf.row_softmax_stats(x)[1].tolist() == [3, 2, 98, 0]


def test_special_rows(cpu_isa):
    x = torch.randn(3, 40)
    x[0, :] = NEG_INF  # all padding: (-inf, 0, 0)
    x[1, 17] = float("nan")
    x[1, 30] = float("nan")
    x[2, 5] = float("inf")
    mx, arg, se = torch.ops.mrlhf.row_softmax_stats(x)
    assert mx[0].item() == NEG_INF and arg[0].item() == 0 and se[0].item() == 0.0
    assert mx[1].isnan() and arg[1].item() == 17 and se[1].isnan()  # NaN propagates, like torch.max
    assert mx[2].item() == float("inf") and arg[2].item() == 5
    rmx, rarg, _ = reference.row_softmax_stats(x)
    assert torch.equal(arg, rarg) and torch.equal(mx[[0, 2]], rmx[[0, 2]]) and rmx[1].isnan()


def test_logsumexp_and_log_prob_agree_with_torch(cpu_isa):
    """What the sampler builds from it: log p(argmax) = -log(sumexp), against torch.log_softmax in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8064, generator=g) * 3
    x[:, 8000:] = NEG_INF
    mx, arg, se = torch.ops.mrlhf.row_softmax_stats(x)
    want = torch.log_softmax(x.double(), dim=-1)
    assert torch.equal(arg, want.argmax(-1))
    got = (x.gather(1, arg[:, None]).squeeze(1) - (mx + torch.log(se))).double()
    assert (got - want.max(-1).values).abs().max().item() <= 1e-5


def test_opcheck_and_errors():
    torch.library.opcheck(torch.ops.mrlhf.row_softmax_stats.default, (torch.randn(3, 50),))
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.mrlhf.row_softmax_stats(torch.randn(2, 8).double())
    with pytest.raises(RuntimeError, match=r"must be \[B, V\]"):
        torch.ops.mrlhf.row_softmax_stats(torch.randn(8))
    with pytest.raises(RuntimeError, match="no columns"):
        torch.ops.mrlhf.row_softmax_stats(torch.randn(2, 0))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.mrlhf.row_softmax_stats(torch.randn(8, 4).t())


def test_wrapper_falls_back_to_the_reference():
    """kv_ops.row_softmax_stats: bf16 or 3-d input goes to the twin (same results), float32 2-d to the kernel."""
    x = torch.randn(4, 70)
    for got, want in zip(kv_ops.row_softmax_stats(x.bfloat16()), reference.row_softmax_stats(x.bfloat16())):
        assert torch.equal(got, want)
    for got, want in zip(kv_ops.row_softmax_stats(x), torch.ops.mrlhf.row_softmax_stats(x)):
        assert torch.equal(got, want)
