"""The mrlhf._C KV-cache operators (CPU kernels) against their pure-torch twin, plus opcheck and the nvcc check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mrlhf.ops import kv_ops, reference

ROOT = Path(__file__).resolve().parents[2]
needs_ext = pytest.mark.skipif("cpu" not in kv_ops.EXT_DEVICES, reason=f"mrlhf._C not in use: {kv_ops.BACKEND}")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (B, L, H, G, D, T): GQA 8/2, MHA, T = 1 and T > 1, and one long single sequence where auto picks several splits.
SHAPES = [
    (3, 40, 8, 2, 64, 1),
    (2, 33, 4, 4, 32, 5),
    (4, 96, 8, 2, 128, 7),
    (1, 700, 2, 1, 16, 3),
]


def rope_tables(pos: torch.Tensor, dim: int, dtype: torch.dtype, base: float = 10000.0):
    """Megatron-style (non-interleaved) cos/sin [*pos.shape, dim] for integer positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = pos.to(torch.float32)[..., None] * inv_freq  # [..., dim / 2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_case(shape, dtype, rope: bool, seed: int, device: str = "cpu"):
    """Caches full of junk (so stray reads show), a ragged append, left padding, and the decode query."""
    B, L, H, G, D, T = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    def uniform(*s):  # values in [-1, 1): keeps attention outputs below 1, where one bf16 ulp is < 1e-2
        return (torch.rand(*s, generator=gen) * 2 - 1).to(dtype)

    positions = torch.randint(0, L - T + 1, (B,), generator=gen)
    lengths = positions + T
    starts = (torch.rand(B, generator=gen) * positions).long()  # left padding, 0 <= starts <= positions
    case = dict(
        k_cache=randn(B, L, G, D),
        v_cache=uniform(B, L, G, D),
        k_new=randn(B, T, G, D),
        v_new=uniform(B, T, G, D),
        positions=positions,
        q=randn(B, H, D),
        starts=starts,
        lengths=lengths,
        cos=None,
        sin=None,
        q_cos=None,
        q_sin=None,
    )
    if rope:
        case["cos"], case["sin"] = rope_tables(positions[:, None] + torch.arange(T), D, dtype)  # [B, T, D]
        case["q_cos"], case["q_sin"] = rope_tables(lengths - 1, D, dtype)  # [B, D]
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def append_args(c, k_cache, v_cache):
    return (k_cache, v_cache, c["k_new"], c["v_new"], c["positions"], c["cos"], c["sin"])


def decode_args(c, k_cache, v_cache, num_splits):
    scale = c["q"].shape[-1] ** -0.5
    return (c["q"], k_cache, v_cache, c["starts"], c["lengths"], c["q_cos"], c["q_sin"], scale, num_splits)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [False, True])
def test_cpu_kernels_match_reference(shape, dtype, rope, cpu_isa):
    c = make_case(shape, dtype, rope, seed=SHAPES.index(shape) * 2 + rope)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    kr, vr = c["k_cache"].clone(), c["v_cache"].clone()
    torch.ops.mrlhf.kv_append(*append_args(c, kc, vc))
    reference.kv_append(*append_args(c, kr, vr))
    assert max_diff(kc, kr) <= TOL[dtype] and max_diff(vc, vr) <= TOL[dtype]
    expected = reference.decode_attention(*decode_args(c, kr, vr, 1))
    for num_splits in (1, 3, 0):
        out = torch.ops.mrlhf.decode_attention(*decode_args(c, kc, vc, num_splits))
        assert out.dtype == dtype and out.shape == c["q"].shape
        assert max_diff(out, expected) <= TOL[dtype], f"num_splits={num_splits}"


@needs_ext
def test_float16_matches_reference(cpu_isa):
    c = make_case(SHAPES[0], torch.float16, rope=True, seed=5)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    kr, vr = c["k_cache"].clone(), c["v_cache"].clone()
    torch.ops.mrlhf.kv_append(*append_args(c, kc, vc))
    reference.kv_append(*append_args(c, kr, vr))
    assert max_diff(kc, kr) <= 2e-3
    out = torch.ops.mrlhf.decode_attention(*decode_args(c, kc, vc, 3))
    assert max_diff(out, reference.decode_attention(*decode_args(c, kr, vr, 1))) <= 2e-3


@needs_ext
@pytest.mark.parametrize("shape", SHAPES[2:])
def test_split_k_equals_no_split(shape):
    c = make_case(shape, torch.float32, rope=True, seed=11)
    kc, vc = c["k_cache"], c["v_cache"]
    one = torch.ops.mrlhf.decode_attention(*decode_args(c, kc, vc, 1))
    L = shape[1]
    for num_splits in (2, 5, 17, 0, L + 5):  # L + 5: more splits than slots, most of them empty
        out = torch.ops.mrlhf.decode_attention(*decode_args(c, kc, vc, num_splits))
        assert max_diff(out, one) <= 1e-6, f"num_splits={num_splits}"


def impl(name: str, backend: str):
    """torch.ops.mrlhf.<name> or reference.<name>; looked up lazily so collection works without the extension."""
    return getattr(torch.ops.mrlhf, name) if backend == "ext" else getattr(reference, name)


BACKENDS = [pytest.param("ext", marks=needs_ext), "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_range_gives_zeros(backend):
    op = impl("decode_attention", backend)
    c = make_case((3, 20, 4, 2, 16, 1), torch.float32, rope=False, seed=3)
    starts = torch.tensor([0, 5, 9])
    lengths = torch.tensor([0, 5, 4])  # empty, empty, starts > lengths
    out = op(c["q"], c["k_cache"], c["v_cache"], starts, lengths, None, None, 0.25, 2)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_position", [18, -1])
def test_append_out_of_range_raises(backend, bad_position):
    op = impl("kv_append", backend)
    B, L, G, D, T = 2, 20, 2, 8, 3
    k_cache, v_cache = torch.zeros(B, L, G, D), torch.zeros(B, L, G, D)
    new = torch.ones(B, T, G, D)
    positions = torch.tensor([0, bad_position])  # 18 + 3 > 20
    with pytest.raises(RuntimeError, match="past the cache|cache holds"):
        op(k_cache, v_cache, new, new, positions, None, None)
    assert not k_cache.any()  # nothing written before the error
    op(k_cache, v_cache, new, new, torch.tensor([0, L - T]), None, None)  # the last slot is fine


@needs_ext
def test_bad_shapes_raise_clear_errors():
    q, cache = torch.randn(2, 6, 8), torch.randn(2, 10, 4, 8)  # 6 query heads over 4 kv heads
    idx = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        torch.ops.mrlhf.decode_attention(q, cache, cache, idx, idx, None, None, 1.0, 1)
    with pytest.raises(RuntimeError, match="int64"):
        new = torch.randn(2, 1, 4, 8)
        torch.ops.mrlhf.kv_append(cache, cache.clone(), new, new, idx.int(), None, None)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.mrlhf.kv_append(cache, cache.clone(), cache[:, :1], cache[:, :1], idx, None, None)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_by_token_decode_equals_causal_sdpa(rope, dtype):
    """Append one token at a time and decode: each step equals row t of full causal attention (SDPA).

    Goes through the kv_ops wrappers, so it checks whichever backend is in use.
    """
    B, S, H, G, D, L = 2, 12, 8, 2, 32, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, S, H, D, generator=gen).to(dtype)
    k = torch.randn(B, S, G, D, generator=gen).to(dtype)
    v = (torch.rand(B, S, G, D, generator=gen) * 2 - 1).to(dtype)
    cos, sin = rope_tables(torch.arange(S).expand(B, S), D, dtype)  # [B, S, D]
    k_cache, v_cache = torch.zeros(B, L, G, D, dtype=dtype), torch.zeros(B, L, G, D, dtype=dtype)

    # Full causal attention on the rotated sequence, in fp32: [b, s, n, d] -> [b, n, s, d].
    qr, kr = (reference.apply_rope(x, cos[:, :, None], sin[:, :, None]) if rope else x.float() for x in (q, k))
    full = F.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), v.float().transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)  # [B, S, H, D]

    for t in range(S):
        k_t, v_t = k[:, t : t + 1].contiguous(), v[:, t : t + 1].contiguous()  # the ops take contiguous tensors
        rot = (cos[:, t : t + 1].contiguous(), sin[:, t : t + 1].contiguous()) if rope else (None, None)
        kv_ops.kv_append(k_cache, v_cache, k_t, v_t, torch.full((B,), t), *rot)
        qrot = (cos[:, t].contiguous(), sin[:, t].contiguous()) if rope else (None, None)
        starts, lengths = torch.zeros(B, dtype=torch.long), torch.full((B,), t + 1)
        out = kv_ops.decode_attention(q[:, t].contiguous(), k_cache, v_cache, starts, lengths, *qrot, num_splits=0)
        assert max_diff(out, full[:, t]) <= TOL[dtype], f"step {t}"
    assert t == S - 1 and max_diff(out, full[:, -1]) <= TOL[dtype]  # the last position, explicitly


OPCHECK_SHAPES = [(2, 16, 4, 2, 8, 1), (3, 24, 6, 3, 16, 4), (1, 9, 2, 2, 4, 2)]


@needs_ext
@pytest.mark.parametrize("shape", OPCHECK_SHAPES)
@pytest.mark.parametrize("rope", [False, True])
def test_opcheck(shape, rope):
    c = make_case(shape, torch.float32, rope, seed=1)
    torch.library.opcheck(torch.ops.mrlhf.kv_append.default, append_args(c, c["k_cache"].clone(), c["v_cache"].clone()))
    for num_splits in (1, 2):
        torch.library.opcheck(
            torch.ops.mrlhf.decode_attention.default, decode_args(c, c["k_cache"], c["v_cache"], num_splits)
        )


@needs_ext
def test_wrappers_use_the_extension_and_fake_impls():
    assert kv_ops.BACKEND.startswith("mrlhf._C")
    assert "compiled kernels for cpu" in kv_ops.describe_backend()
    assert f"CPU vector path: {torch.ops.mrlhf.cpu_isa()}" in kv_ops.describe_backend()
    c = make_case(SHAPES[0], torch.float32, rope=True, seed=2, device="meta")
    out = kv_ops.decode_attention(c["q"], c["k_cache"], c["v_cache"], c["starts"], c["lengths"], c["q_cos"], c["q_sin"])
    assert out.device.type == "meta" and out.shape == c["q"].shape


def test_disable_env_forces_reference():
    """MRLHF_DISABLE_EXT=1: the package imports and the ops run on the torch reference."""
    code = (
        "import torch; from mrlhf import ops; "
        "kc = torch.zeros(1, 4, 1, 2); ops.kv_append(kc, kc.clone(), torch.ones(1, 1, 1, 2), "
        "torch.ones(1, 1, 1, 2), torch.tensor([1])); "
        "print(ops.BACKEND, '|', ops.describe_backend(), '|', kc[0, :, 0, 0].tolist())"
    )
    env = {**os.environ, kv_ops.DISABLE_ENV: "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        "torch reference | KV-cache ops: torch reference (MRLHF_DISABLE_EXT=1) | [0.0, 1.0, 0.0, 0.0]"
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc():
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_cuda_compile.sh")], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout


def test_debug_checks_switch_round_trips():
    from mrlhf.ops.kv_ops import set_debug_checks

    assert set_debug_checks(True) is False  # off by default
    assert set_debug_checks(False) is True
    assert set_debug_checks(False) is False
    # the CPU kernel checks bounds whatever the switch says
    k = torch.zeros(1, 4, 1, 2)
    new = torch.ones(1, 2, 1, 2)
    with pytest.raises(RuntimeError, match="past the cache|cache holds"):
        torch.ops.mrlhf.kv_append(k, k.clone(), new, new, torch.tensor([3]), None, None)
