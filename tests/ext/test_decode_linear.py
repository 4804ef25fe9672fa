"""mrlhf::decode_linear (the CPU kernel for the few-row matmuls of a decode step) against its torch twin."""

from __future__ import annotations

import pytest
import torch

from mrlhf.ops import kv_ops, reference

needs_ext = pytest.mark.skipif("cpu" not in kv_ops.EXT_DEVICES, reason=f"mrlhf._C not in use: {kv_ops.BACKEND}")
pytestmark = needs_ext

# (M, N, K): 1..33 rows (the AVX2 4-input and AVX-512 6-input blocks and their tails), N not a multiple of 2 or 4
# (the last weight rows), K not a multiple of 8 or 16 (scalar / masked tails), the shapes of the benchmark model,
# and an LM head. Every case runs on each CPU path the machine has (the cpu_isa fixture, tests/ext/conftest.py).
SHAPES = [(1, 8, 8), (3, 7, 13), (4, 768, 256), (5, 33, 40), (16, 1024, 256), (16, 256, 1024), (17, 61, 200),
          (33, 9, 64), (2, 8000, 64), (8, 5, 1), (7, 6, 37), (13, 3, 16)]  # fmt: skip
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def case(shape, dtype, seed=0, bias=True):
    m, n, k = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(m, k, generator=g) * 2 - 1).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_reference(shape, dtype, bias, cpu_isa):
    x, w, b = case(shape, dtype, seed=sum(shape), bias=bias)
    got = torch.ops.mrlhf.decode_linear(x, w, b)
    want = reference.decode_linear(x, w, b)
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    # outputs are O(1): absolute tolerance is relative; bf16/fp16 may differ by one ulp of the output
    assert err <= TOL[dtype], (shape, dtype, err)


def test_fp32_agrees_with_float64_better_than_blas_or_equal(cpu_isa):
    """Accumulation is fp32 like BLAS; its error against a float64 product is of the same order (not a lossy path)."""
    x, w, b = case((16, 8000, 256), torch.float32, seed=1)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    ours = (torch.ops.mrlhf.decode_linear(x, w, b).double() - exact).abs().max().item()
    blas = (torch.nn.functional.linear(x, w, b).double() - exact).abs().max().item()
    assert ours <= max(2 * blas, 1e-6), (ours, blas)


def test_every_output_written_once(cpu_isa):
    """No element left unwritten or written from a neighbour's row: ones-vectors make each output a known sum."""
    for m, n, k in [(5, 9, 11), (4, 2, 16), (7, 1, 3), (1, 3, 64)]:
        x = torch.arange(1, m + 1, dtype=torch.float32)[:, None].expand(m, k).contiguous()
        w = torch.arange(1, n + 1, dtype=torch.float32)[:, None].expand(n, k).contiguous()
        b = torch.arange(n, dtype=torch.float32) * 1000
        want = torch.outer(torch.arange(1, m + 1.0), torch.arange(1, n + 1.0)) * k + b
        assert torch.equal(torch.ops.mrlhf.decode_linear(x, w, b), want)


def test_opcheck():
    for shape, bias in [((3, 7, 13), True), ((4, 16, 32), False)]:
        torch.library.opcheck(torch.ops.mrlhf.decode_linear.default, case(shape, torch.float32, bias=bias))


def test_bad_inputs_raise_clear_errors():
    x, w, b = case((2, 4, 8), torch.float32)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, 8\]"):
        torch.ops.mrlhf.decode_linear(x, w[:, :4].contiguous(), b)
    with pytest.raises(RuntimeError, match="differs from x"):
        torch.ops.mrlhf.decode_linear(x, w.double(), b)
    with pytest.raises(RuntimeError, match=r"bias must be \[4\]"):
        torch.ops.mrlhf.decode_linear(x, w, b[:3].contiguous())
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.mrlhf.decode_linear(x, w.t().contiguous().t(), b)
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\]"):
        torch.ops.mrlhf.decode_linear(x[None], w, b)


def test_wrapper_shapes_rows_and_fallback():
    """kv_ops.decode_linear takes [..., K]; above DECODE_LINEAR_MAX_ROWS rows and for non-contiguous inputs it still
    gives the matmul's answer; the fake impl gives the shape."""
    x, w, b = case((6, 10, 24), torch.float32)
    out = kv_ops.decode_linear(x.view(1, 6, 24), w, b)
    assert out.shape == (1, 6, 10)
    torch.testing.assert_close(out[0], reference.decode_linear(x, w, b), atol=1e-5, rtol=0)
    big, _, _ = case((kv_ops.DECODE_LINEAR_MAX_ROWS + 1, 10, 24), torch.float32)
    assert torch.equal(kv_ops.decode_linear(big, w, b), torch.nn.functional.linear(big, w, b))
    strided = torch.randn(24, 6).t()
    torch.testing.assert_close(kv_ops.decode_linear(strided, w), strided @ w.t(), atol=1e-5, rtol=0)
    with torch.device("meta"):
        assert torch.ops.mrlhf.decode_linear(torch.empty(3, 24), torch.empty(10, 24), None).shape == (3, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 13), (16, 1024, 256), (5, 33, 40), (16, 8000, 64)])
@pytest.mark.parametrize("activation,with_residual", [("gelu_tanh", False), ("gelu_tanh", True), ("none", True)])
def test_epilogue_matches_reference(shape, activation, with_residual, cpu_isa):
    """y = residual + act(x W^T + b) in float32: GELU (tanh form) over large and small arguments, the residual add,
    column ranges that are not a multiple of the vector width (each thread applies it to its own columns)."""
    x, w, b = case(shape, torch.float32, seed=sum(shape))
    x = x * 6  # pre-activations over about [-15, 15]: both GELU tails and the middle
    r = torch.randn(shape[0], shape[1]) if with_residual else None
    got = torch.ops.mrlhf.decode_linear(x, w, b, r, activation)
    want = reference.decode_linear(x, w, b, r, activation)
    err = (got - want).abs().max().item()
    assert err <= 2e-5, (shape, activation, with_residual, err)  # outputs up to ~15: a few fp32 ulps


def test_epilogue_gelu_against_float64(cpu_isa):
    """The kernel's GELU (tanh from the exp polynomial) against a float64 GELU: within 1e-6 absolute per element
    over [-20, 20] (x times a 1 x 1 identity weight is exact, so only the epilogue is measured)."""
    v = torch.linspace(-20, 20, 4001)
    got = torch.ops.mrlhf.decode_linear(v[:, None].contiguous(), torch.eye(1), None, None, "gelu_tanh")[:, 0]
    want = torch.nn.functional.gelu(v.double(), approximate="tanh")
    assert (got.double() - want).abs().max().item() <= 1e-6


def test_epilogue_errors_and_wrapper_fallback():
    x, w, b = case((4, 6, 8), torch.float32)
    with pytest.raises(RuntimeError, match="activation must be 'none' or 'gelu_tanh', got 'relu'"):
        torch.ops.mrlhf.decode_linear(x, w, b, None, "relu")
    with pytest.raises(RuntimeError, match=r"residual must be \[4, 6\]"):
        torch.ops.mrlhf.decode_linear(x, w, b, torch.zeros(4, 5), "none")
    with pytest.raises(RuntimeError, match="epilogue is float32 only"):
        torch.ops.mrlhf.decode_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), None, "gelu_tanh")
    with pytest.raises(ValueError, match="got 'relu'"):
        kv_ops.decode_linear(x.double(), w.double(), b.double(), activation="relu")
    # the wrapper: [..., K] with a [..., N] residual through the kernel; bf16 and > 32 rows through torch ops
    r = torch.randn(1, 4, 6)
    got = kv_ops.decode_linear(x.view(1, 4, 8), w, b, residual=r, activation="gelu_tanh")
    torch.testing.assert_close(got[0], reference.decode_linear(x, w, b, r[0], "gelu_tanh"), atol=1e-5, rtol=0)
    xb, wb, bb, rb = x.bfloat16(), w.bfloat16(), b.bfloat16(), r[0].bfloat16()
    want = rb + torch.nn.functional.gelu(torch.nn.functional.linear(xb, wb, bb), approximate="tanh")
    assert torch.equal(kv_ops.decode_linear(xb, wb, bb, residual=rb, activation="gelu_tanh"), want)
    big, _, _ = case((kv_ops.DECODE_LINEAR_MAX_ROWS + 1, 6, 8), torch.float32)
    rbig = torch.randn(big.shape[0], 6)
    want = rbig + torch.nn.functional.gelu(torch.nn.functional.linear(big, w, b), approximate="tanh")
    assert torch.equal(kv_ops.decode_linear(big, w, b, residual=rbig, activation="gelu_tanh"), want)
    torch.library.opcheck(torch.ops.mrlhf.decode_linear.default, (x, w, b, torch.randn(4, 6), "gelu_tanh"))


def test_cpu_isa_switch_and_errors():
    """mrlhf::cpu_isa reports the path in use, switches paths, refuses unknown names and paths the CPU lacks; the best
    path agrees with what torch detected for its own kernels."""
    before = torch.ops.mrlhf.cpu_isa()
    try:
        best = torch.ops.mrlhf.cpu_isa("best")
        assert torch.ops.mrlhf.cpu_isa() == best
        torch_cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
        expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch_cap, "portable")
        assert best == expected, (best, torch_cap)
        assert torch.ops.mrlhf.cpu_isa("portable") == "portable"
        with pytest.raises(RuntimeError, match="unknown CPU path 'sse9'"):
            torch.ops.mrlhf.cpu_isa("sse9")
        assert torch.ops.mrlhf.cpu_isa() == "portable"  # a refused switch leaves the path as it was
        if best != "avx512":
            with pytest.raises(RuntimeError, match="this CPU has no avx512"):
                torch.ops.mrlhf.cpu_isa("avx512")
    finally:
        torch.ops.mrlhf.cpu_isa(before)


def test_cpu_isa_env_var_picks_the_path():
    """MRLHF_CPU_ISA at start-up picks the path; a bad value fails the first kernel call with the variable's name."""
    import subprocess
    import sys

    code = "import torch, mrlhf._C; print(torch.ops.mrlhf.cpu_isa())"
    env = dict(__import__("os").environ, MRLHF_CPU_ISA="portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"
    env["MRLHF_CPU_ISA"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MRLHF_CPU_ISA: unknown CPU path 'fast'" in bad.stderr
