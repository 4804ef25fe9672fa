"""The sampler's noise and token choice at TP=1 (no process group): the torch twin against a pure-Python splitmix64,
the dispatched noise (the compiled kernel when mrlhf._C is built) against the twin bit for bit, and sample_tokens
against the tokens the sampler drew before its noise moved into mrlhf._C."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps

from mrlhf.generation import sampling
from mrlhf.generation.sampling import SamplingParams, sample_tokens
from mrlhf.ops import kv_ops, reference

M64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def noise_py(seed: int, seq_id: int, step: int, vocab_id: int) -> float:
    """The definition, on Python ints: top 53 bits m of the hash, (m + 0.5) / 2^53 in double."""
    key = splitmix64((splitmix64((seq_id * 1_000_003 + seed) & M64) + step) & M64)
    m = splitmix64(key ^ (vocab_id & M64)) >> 11
    return (m + 0.5) / 2**53


@pytest.fixture
def tp1(monkeypatch):
    """sample_tokens at TP=1 without initialising megatron's process groups."""
    monkeypatch.setattr(ps, "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", 1)


def test_twin_matches_the_python_definition():
    ids = [0, 5, -1, 2**62 + 7, I64_MIN, I64_MAX]
    for seed, step, start in [(1234, 17, 100), (-7, 0, 0), (I64_MAX, 2**40, 2**33 + 1)]:
        u = reference.uniform_noise(seed, torch.tensor(ids), step, start, 6)
        want = [[noise_py(seed, i, step, start + j) for j in range(6)] for i in ids]
        assert u.tolist() == want  # exact float equality, element by element


def test_known_values():
    """Bits of the pre-kernel sampler (its torch code, December 2026); the kernel tests in tests/ext check the same ones."""
    u = reference.uniform_noise(1234, torch.tensor([0, 5, -1, 2**62 + 7, I64_MIN]), 17, 100, 10)
    want = ["0x1.251e88821490ap-1", "0x1.bec355ce99470p-1", "0x1.7aa0495a35342p-1", "0x1.feaeda93a7ee4p-4"]
    assert [x.hex() for x in u[:4, 0].tolist()] == want
    assert u[4, 0].item().hex() == "0x1.cf2ba38faf9f4p-1"


@pytest.mark.parametrize("b,v", [(1, 1), (1, 9), (3, 17), (16, 8000), (2, 8003)])
def test_dispatched_noise_equals_the_twin_bitwise(b, v):
    """kv_ops.uniform_noise is mrlhf::uniform_noise on the CPU when the extension is built: it must equal the twin
    for any ids (full int64 range), seed, step and vocab offset (a TP shard), and every input must move it."""
    g = torch.Generator().manual_seed(b * 10_000 + v)
    for vocab_start in [0, 4000, 2**40 + 3]:
        ids = torch.randint(I64_MIN, I64_MAX, (b,), generator=g)
        seed, step = int(torch.randint(I64_MIN, I64_MAX, (1,), generator=g)), int(torch.randint(0, 2**62, (1,)))
        got = kv_ops.uniform_noise(seed, ids, step, vocab_start, v)
        assert got.dtype == torch.float64 and got.shape == (b, v)
        assert torch.equal(got, reference.uniform_noise(seed, ids, step, vocab_start, v))
        assert not torch.equal(got, kv_ops.uniform_noise(seed + 1, ids, step, vocab_start, v))


def old_sampled_tokens(
    logits: torch.Tensor, params: SamplingParams, seq_ids: torch.Tensor, step: int, vocab_start: int
) -> torch.Tensor:
    """The pre-kernel sampler's sampled-token path at TP=1, op for op (twin noise, out-of-place Gumbel and add)."""
    scaled = logits.float() if params.temperature == 1.0 else logits.float() / params.temperature
    choice = scaled
    if params.top_k > 0 or params.top_p < 1.0:
        k = params.top_k if params.top_k > 0 else params.top_p_candidates
        threshold = sampling._candidates_threshold(scaled, k, params.top_p)
        choice = scaled.masked_fill(scaled < threshold[:, None], float("-inf"))
    gumbel = -torch.log(-torch.log(reference.uniform_noise(params.seed, seq_ids, step, vocab_start, logits.shape[-1])))
    return (choice.double() + gumbel).max(dim=-1).indices + vocab_start


PARAMS = [
    SamplingParams(temperature=1.0, seed=3),
    SamplingParams(temperature=0.7, seed=11, top_k=20),
    SamplingParams(temperature=1.3, seed=5, top_p=0.9),
]

# Drawn by the sampler before its noise moved into mrlhf._C (logits and ids of test_tokens_are_the_ones_drawn_before)
BEFORE = {
    (0, 0, 0): [657, 434, 408, 822, 824, 93],
    (0, 9, 4000): [4393, 4733, 4932, 4479, 4835, 4509],
    (1, 0, 0): [337, 472, 337, 283, 835, 854],
    (1, 9, 4000): [4337, 4210, 4107, 4421, 4251, 4245],
    (2, 0, 0): [337, 210, 755, 779, 937, 973],
    (2, 9, 4000): [4864, 4472, 4520, 4310, 4828, 4399],
}


def test_tokens_are_the_ones_drawn_before(tp1):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * 2
    logits[:, 990:] = float("-inf")  # padding columns
    ids = torch.tensor([0, 1, 2, 3, 1000, 2**40])
    for (p, step, vocab_start), want in BEFORE.items():
        tokens, logprobs = sample_tokens(logits, PARAMS[p], ids, step, vocab_start)
        assert tokens.tolist() == want, (PARAMS[p], step, vocab_start)
        assert logprobs.dtype == torch.float32 and bool((logprobs <= 0).all())


@pytest.mark.parametrize("b,v", [(1, 7), (4, 33), (16, 8000)])
def test_tokens_equal_the_old_sampler(b, v, tp1):
    """Random logits, ids, seeds and shard offsets: the sampler picks what the out-of-place twin path picks."""
    g = torch.Generator().manual_seed(b + v)
    for trial, params in enumerate(PARAMS * 2):
        params = SamplingParams(**{**params.__dict__, "seed": int(torch.randint(I64_MIN, I64_MAX, (1,), generator=g))})
        logits = torch.randn(b, v, generator=g) * 3
        ids = torch.randint(I64_MIN, I64_MAX, (b,), generator=g)
        vocab_start = [0, 8000, 123][trial % 3]
        tokens, _ = sample_tokens(logits, params, ids, trial, vocab_start)
        assert torch.equal(tokens, old_sampled_tokens(logits, params, ids, trial, vocab_start)), params


def test_a_new_seed_draws_other_tokens(tp1):
    """The comparisons above would pass for a sampler that ignored its noise source only if the noise never moved."""
    logits = torch.zeros(64, 1000)  # flat: the noise alone decides
    ids = torch.arange(64)
    a, _ = sample_tokens(logits, SamplingParams(seed=1), ids, 0, 0)
    b, _ = sample_tokens(logits, SamplingParams(seed=2), ids, 0, 0)
    c, _ = sample_tokens(logits, SamplingParams(seed=1), ids, 1, 0)
    assert (a != b).float().mean().item() > 0.9 and (a != c).float().mean().item() > 0.9
    assert torch.equal(a, sample_tokens(logits, SamplingParams(seed=1), ids, 0, 0)[0])  # and repeats
