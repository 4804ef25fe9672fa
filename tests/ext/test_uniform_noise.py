"""mrlhf::uniform_noise (the Gumbel-max sampler's U(0,1) noise) against its torch twin, bit for bit, on every CPU path."""

from __future__ import annotations

import pytest
import torch

from mrlhf.ops import kv_ops, reference

pytestmark = pytest.mark.skipif("cpu" not in kv_ops.EXT_DEVICES, reason=f"mrlhf._C not in use: {kv_ops.BACKEND}")

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
EDGE_IDS = [0, 1, -1, I64_MAX, I64_MIN, 2**62 + 7, 1_000_003]


def check(seed: int, seq_ids: torch.Tensor, step: int, vocab_start: int, vocab_size: int) -> torch.Tensor:
    got = torch.ops.mrlhf.uniform_noise(seed, seq_ids, step, vocab_start, vocab_size)
    want = reference.uniform_noise(seed, seq_ids, step, vocab_start, vocab_size)
    assert got.dtype == torch.float64 and got.shape == (seq_ids.shape[0], vocab_size)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"kernel != twin at {bad}: {[(got[i, j].item(), want[i, j].item()) for i, j in bad]}")
    return got


# V around the vector widths (4 doubles on AVX2, 8 on AVX-512) and real vocab sizes, B = 1 included
@pytest.mark.parametrize(
    "b,v", [(1, 1), (1, 7), (2, 4), (3, 5), (1, 8), (4, 9), (2, 15), (5, 17), (16, 8000), (3, 8003)]
)
def test_matches_reference_bitwise(b, v, cpu_isa):
    g = torch.Generator().manual_seed(b * 100_000 + v)
    for trial in range(4):
        seq_ids = torch.randint(I64_MIN, I64_MAX, (b,), generator=g)  # the whole int64 range, negatives included
        seed = int(torch.randint(I64_MIN, I64_MAX, (1,), generator=g))
        step = [0, 1, 2**31 + 5, 2**62][trial]
        vocab_start = [0, 4000, 2**40 + 3, 123][trial]  # a TP shard starts past 0, not on a vector boundary
        check(seed, seq_ids, step, vocab_start, v)


def test_edge_ids_seeds_and_steps(cpu_isa):
    ids = torch.tensor(EDGE_IDS)
    for seed in [0, -1, I64_MAX, I64_MIN, 12345]:
        for step in [0, -1, I64_MAX]:
            check(seed, ids, step, 0, 37)
            check(seed, ids, step, I64_MAX - 37, 37)  # vocab ids up to the int64 maximum


def test_known_values(cpu_isa):
    """Fixed bits, worked out by the pure-Python splitmix64 in tests/unit/test_sampling.py (the pre-kernel values)."""
    u = torch.ops.mrlhf.uniform_noise(1234, torch.tensor([0, 5, -1, 2**62 + 7, I64_MIN]), 17, 100, 10)
    want = ["0x1.251e88821490ap-1", "0x1.bec355ce99470p-1", "0x1.7aa0495a35342p-1", "0x1.feaeda93a7ee4p-4"]
    assert [x.hex() for x in u[:4, 0].tolist()] == want


def test_every_input_changes_the_noise(cpu_isa):
    """Equality with the twin would be empty if the noise ignored an input: each one must move (nearly) every value."""
    ids = torch.arange(16) * 7 - 40
    base = check(3, ids, 9, 500, 1000)
    for changed in [
        check(4, ids, 9, 500, 1000),  # seed
        check(3, ids, 10, 500, 1000),  # step
        check(3, ids + 1, 9, 500, 1000),  # sequence ids
        check(3, ids, 9, 501, 1000),  # vocab offset
    ]:
        assert (changed != base).float().mean().item() > 0.99
    assert (base[1:] != base[:1]).all()  # rows differ
    assert 0.0 < base.min().item() and base.max().item() < 1.0 and abs(base.mean().item() - 0.5) < 0.01


def test_a_shard_is_a_slice_of_the_full_vocab(cpu_isa):
    """What makes samples independent of the TP layout: rank r's noise is columns [start, start + V/tp) of TP=1's."""
    ids = torch.tensor([0, 3, 2**40])
    full = check(7, ids, 2, 0, 1003)
    for start, n in [(0, 501), (501, 502), (8, 17), (1002, 1)]:
        assert torch.equal(torch.ops.mrlhf.uniform_noise(7, ids, 2, start, n), full[:, start : start + n])


def test_empty_and_non_contiguous(cpu_isa):
    assert torch.ops.mrlhf.uniform_noise(1, torch.tensor([1, 2]), 0, 0, 0).shape == (2, 0)
    assert torch.ops.mrlhf.uniform_noise(1, torch.zeros(0, dtype=torch.long), 0, 0, 5).shape == (0, 5)
    ids = torch.arange(20)[::3]  # strided
    check(1, ids, 0, 0, 33)


def test_opcheck_and_errors():
    torch.library.opcheck(torch.ops.mrlhf.uniform_noise.default, (5, torch.tensor([1, -2, 3]), 4, 10, 50))
    with pytest.raises(RuntimeError, match="must be int64"):
        torch.ops.mrlhf.uniform_noise(0, torch.tensor([1, 2], dtype=torch.int32), 0, 0, 8)
    with pytest.raises(RuntimeError, match=r"must be \[B\]"):
        torch.ops.mrlhf.uniform_noise(0, torch.zeros(2, 2, dtype=torch.long), 0, 0, 8)
    with pytest.raises(RuntimeError, match="vocab_size must be >= 0"):
        torch.ops.mrlhf.uniform_noise(0, torch.tensor([1]), 0, 0, -1)


def test_wrapper_uses_the_kernel_and_casts_ids():
    """kv_ops.uniform_noise: CPU ids go to the kernel (int32 ids cast to int64 first, as the twin's .long() does)."""
    ids = torch.tensor([4, 9, -3])
    assert torch.equal(kv_ops.uniform_noise(2, ids, 1, 0, 40), torch.ops.mrlhf.uniform_noise(2, ids, 1, 0, 40))
    assert torch.equal(kv_ops.uniform_noise(2, ids.int(), 1, 0, 40), reference.uniform_noise(2, ids.int(), 1, 0, 40))
