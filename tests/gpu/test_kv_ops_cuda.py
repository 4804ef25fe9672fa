"""The mrlhf._C KV-cache operators' CUDA kernels against the pure-torch twin (run on the same GPU tensors)."""

from __future__ import annotations

import pytest
import torch

from mrlhf.ops import kv_ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cuda_kernels = pytest.mark.skipif(
    "cuda" not in kv_ops.EXT_DEVICES, reason=f"mrlhf._C has no CUDA kernels here ({kv_ops.BACKEND})"
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (B, L, H, G, D, T): GQA and MHA, T = 1 and T > 1, head dims that fill 2/4/8 values per lane (and a ragged one:
# 80 leaves lanes idle), and a long cache where the automatic split count is > 1.
SHAPES = [
    (3, 40, 8, 2, 64, 1),
    (2, 33, 4, 4, 32, 5),
    (4, 96, 8, 2, 128, 7),
    (2, 130, 6, 2, 80, 2),
    (2, 300, 4, 1, 256, 3),
    (1, 4096, 2, 1, 64, 1),
]


def rope_tables(pos: torch.Tensor, dim: int, dtype: torch.dtype, base: float = 10000.0):
    """Megatron-style (non-interleaved) cos/sin [*pos.shape, dim]."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    angles = pos.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_case(shape, dtype, rope: bool, seed: int):
    """Junk-filled caches, ragged append positions, left-padding starts, decode query; all on cuda."""
    B, L, H, G, D, T = shape
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen).to(dtype).cuda()  # noqa: E731
    uniform = lambda *s: (torch.rand(*s, generator=gen) * 2 - 1).to(dtype).cuda()  # noqa: E731  |out| < 1
    positions = torch.randint(0, L - T + 1, (B,), generator=gen)
    starts = (torch.rand(B, generator=gen) * positions).long().cuda()
    positions = positions.cuda()
    c = dict(k_cache=randn(B, L, G, D), v_cache=uniform(B, L, G, D), k_new=randn(B, T, G, D), v_new=uniform(B, T, G, D))
    c.update(positions=positions, starts=starts, lengths=positions + T, q=randn(B, H, D))
    c["cos"], c["sin"] = (
        rope_tables(positions[:, None] + torch.arange(T, device="cuda"), D, dtype) if rope else (None,) * 2
    )
    c["q_cos"], c["q_sin"] = rope_tables(c["lengths"] - 1, D, dtype) if rope else (None, None)
    return c


def append_args(c, k_cache, v_cache):
    return (k_cache, v_cache, c["k_new"], c["v_new"], c["positions"], c["cos"], c["sin"])


def decode_args(c, k_cache, v_cache, num_splits):
    scale = c["q"].shape[-1] ** -0.5
    return (c["q"], k_cache, v_cache, c["starts"], c["lengths"], c["q_cos"], c["q_sin"], scale, num_splits)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@needs_cuda_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_kernels_match_reference(shape, dtype, rope):
    c = make_case(shape, dtype, rope, seed=SHAPES.index(shape) * 2 + rope)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    kr, vr = c["k_cache"].clone(), c["v_cache"].clone()
    torch.ops.mrlhf.kv_append(*append_args(c, kc, vc))
    reference.kv_append(*append_args(c, kr, vr))
    assert max_diff(kc, kr) <= TOL[dtype] and max_diff(vc, vr) <= TOL[dtype]
    expected = reference.decode_attention(*decode_args(c, kr, vr, 1))
    for num_splits in (1, 3, 0):
        out = torch.ops.mrlhf.decode_attention(*decode_args(c, kc, vc, num_splits))
        assert out.dtype == dtype and out.device == c["q"].device
        assert max_diff(out, expected) <= TOL[dtype], f"num_splits={num_splits}"


@needs_cuda_kernels
def test_cuda_split_k_equals_no_split():
    c = make_case(SHAPES[-1], torch.float32, rope=True, seed=11)
    one = torch.ops.mrlhf.decode_attention(*decode_args(c, c["k_cache"], c["v_cache"], 1))
    for num_splits in (2, 7, 64, 0, 5000):
        out = torch.ops.mrlhf.decode_attention(*decode_args(c, c["k_cache"], c["v_cache"], num_splits))
        assert max_diff(out, one) <= 1e-6, f"num_splits={num_splits}"


@needs_cuda_kernels
def test_cuda_empty_range_and_out_of_range_append():
    c = make_case((3, 20, 4, 2, 16, 1), torch.float32, rope=False, seed=3)
    starts, lengths = torch.tensor([0, 5, 9], device="cuda"), torch.tensor([0, 5, 4], device="cuda")
    out = torch.ops.mrlhf.decode_attention(c["q"], c["k_cache"], c["v_cache"], starts, lengths, None, None, 0.25, 2)
    assert torch.equal(out, torch.zeros_like(out))
    from mrlhf.ops.kv_ops import set_debug_checks

    k_cache = torch.zeros(2, 20, 2, 8, device="cuda")
    new = torch.ones(2, 3, 2, 8, device="cuda")
    positions = torch.tensor([0, 18], device="cuda")
    previous = set_debug_checks(True)  # with the (host-syncing) bounds check: the CPU kernel's error
    try:
        with pytest.raises(RuntimeError, match="past the cache"):
            torch.ops.mrlhf.kv_append(k_cache, k_cache.clone(), new, new, positions, None, None)
        assert not k_cache.any()
    finally:
        set_debug_checks(previous)
    # default (no sync): in-range slots are written, slot 20 of row 1 is skipped, nothing else is touched
    v_cache = k_cache.clone()
    torch.ops.mrlhf.kv_append(k_cache, v_cache, new, new, positions, None, None)
    torch.cuda.synchronize()
    want = torch.zeros_like(k_cache)
    want[0, 0:3] = 1
    want[1, 18:20] = 1
    assert torch.equal(k_cache, want) and torch.equal(v_cache, want)


@needs_cuda_kernels
@pytest.mark.parametrize("rope", [False, True])
def test_cuda_opcheck(rope):
    c = make_case((3, 24, 6, 3, 16, 4), torch.float32, rope, seed=1)
    torch.library.opcheck(torch.ops.mrlhf.kv_append.default, append_args(c, c["k_cache"].clone(), c["v_cache"].clone()))
    torch.library.opcheck(torch.ops.mrlhf.decode_attention.default, decode_args(c, c["k_cache"], c["v_cache"], 2))


def test_wrappers_on_cuda_match_reference():
    """Whatever the backend, the kv_ops wrappers give the reference result on CUDA tensors."""
    c = make_case(SHAPES[0], torch.float32, rope=True, seed=4)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    kr, vr = c["k_cache"].clone(), c["v_cache"].clone()
    kv_ops.kv_append(*append_args(c, kc, vc))
    reference.kv_append(*append_args(c, kr, vr))
    out = kv_ops.decode_attention(*decode_args(c, kc, vc, 0))
    assert max_diff(out, reference.decode_attention(*decode_args(c, kr, vr, 1))) <= 1e-5
