"""KV-cache ops for rollout decoding, and the one place that picks their implementation (STYLE 3 and 9).

``kv_append`` writes new keys/values into a preallocated cache by position (RoPE on keys on the way in);
``decode_attention`` attends one new query token per sequence over its cache slots (flash-decoding split-K);
``decode_linear`` multiplies the few rows of a decode step by a weight matrix, streaming the weights once (CPU;
BLAS is built for many rows and reads skinny products' weights at a fraction of the memory bandwidth);
``row_softmax_stats`` gives greedy sampling its row max, argmax and sum of exponentials in one call (CPU);
``uniform_noise`` makes the Gumbel-max sampler's counter-based U(0,1) noise in one pass (CPU, bit-identical).
Each call goes to the compiled ``torch.ops.mrlhf.*`` operator when ``mrlhf._C`` is built and has a kernel for the
tensors' device, otherwise to the pure-torch twin in ``mrlhf/ops/reference.py``.

Environment: ``MRLHF_DISABLE_EXT=1`` forces the torch reference everywhere (read once, at import).
"""

from __future__ import annotations

import os

import torch

from mrlhf.ops import reference

DISABLE_ENV = "MRLHF_DISABLE_EXT"


def _load_extension() -> tuple[frozenset[str], str]:
    """(device types with compiled kernels, why the reference is used where it is)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return frozenset(), f"{DISABLE_ENV}=1"
    try:
        import mrlhf._C  # noqa: F401  registers torch.ops.mrlhf; torch is imported first (it links libtorch)
    except ImportError as exc:
        return frozenset(), f"mrlhf._C not built ({exc})"
    devices = {"cpu", "meta"}  # meta: the fake impls below
    if torch._C._dispatch_has_kernel_for_dispatch_key("mrlhf::decode_attention", "CUDA"):
        devices.add("cuda")
    return frozenset(devices), ""


EXT_DEVICES, _REFERENCE_REASON = _load_extension()
"""Device types (``tensor.device.type``) served by the compiled operators; empty when the extension is off."""

if not EXT_DEVICES:
    BACKEND = "torch reference"
elif "cuda" in EXT_DEVICES:
    BACKEND = "mrlhf._C (cpu+cuda)"
else:
    BACKEND = "mrlhf._C (cpu)"


def set_debug_checks(enabled: bool) -> bool:
    """Turn on checks that cost a host sync per call on CUDA (kv_append's bounds check; without it the CUDA kernel
    skips out-of-range slots). Returns the previous setting. The CPU kernels always check (no sync to save)."""
    if not hasattr(torch.ops.mrlhf, "set_debug_checks"):
        return False  # no compiled extension: the torch reference always checks
    return bool(torch.ops.mrlhf.set_debug_checks(enabled))


def describe_backend() -> str:
    """One line for logs: which implementation runs the KV-cache ops, and why."""
    if not EXT_DEVICES:
        return f"KV-cache ops: torch reference ({_REFERENCE_REASON})"
    compiled = ", ".join(sorted(EXT_DEVICES - {"meta"}))
    return (
        f"KV-cache ops: {BACKEND}, compiled kernels for {compiled} (CPU vector path: {torch.ops.mrlhf.cpu_isa()}); "
        f"other devices use the torch reference; "
        f"decode matmuls: {'mrlhf::decode_linear (cpu, <= 32 rows)' if 'cpu' in EXT_DEVICES else 'torch'}"
    )


if EXT_DEVICES:
    # Fake (meta) impls: output shapes for torch.compile / FakeTensor without running a kernel.
    @torch.library.register_fake("mrlhf::kv_append")
    def _kv_append_fake(k_cache, v_cache, k_new, v_new, positions, cos, sin) -> None:
        torch._check(k_new.shape == v_new.shape, lambda: "kv_append: k_new and v_new shapes differ")

    @torch.library.register_fake("mrlhf::decode_linear")
    def _decode_linear_fake(x, weight, bias, residual=None, activation="none") -> torch.Tensor:
        torch._check(x.dim() == 2, lambda: f"decode_linear: x must be [M, K], got {tuple(x.shape)}")
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("mrlhf::row_softmax_stats")
    def _row_softmax_stats_fake(logits):
        torch._check(logits.dim() == 2, lambda: f"row_softmax_stats: logits must be [B, V], got {tuple(logits.shape)}")
        b = logits.shape[0]
        return logits.new_empty((b,)), logits.new_empty((b,), dtype=torch.long), logits.new_empty((b,))

    @torch.library.register_fake("mrlhf::uniform_noise")
    def _uniform_noise_fake(seed, seq_ids, step, vocab_start, vocab_size) -> torch.Tensor:
        torch._check(seq_ids.dim() == 1, lambda: f"uniform_noise: seq_ids must be [B], got {tuple(seq_ids.shape)}")
        return seq_ids.new_empty((seq_ids.shape[0], vocab_size), dtype=torch.float64)

    @torch.library.register_fake("mrlhf::decode_attention")
    def _decode_attention_fake(q, k_cache, v_cache, starts, lengths, cos, sin, scale, num_splits) -> torch.Tensor:
        torch._check(q.dim() == 3, lambda: f"decode_attention: q must be [B, H, D], got {tuple(q.shape)}")
        return torch.empty_like(q)


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> None:
    """Write k_new/v_new [B, T, G, D] into k_cache/v_cache [B, L, G, D] at slots positions[b] + t, in place.

    positions is int64 [B] (ragged per sequence). With cos/sin [B, T, D] the keys are rotated (megatron's
    rotate-half RoPE) before they are stored; values never are. Raises if positions[b] + T > L.
    """
    if k_cache.device.type in EXT_DEVICES:
        torch.ops.mrlhf.kv_append(k_cache, v_cache, k_new, v_new, positions, cos, sin)
    else:
        reference.kv_append(k_cache, v_cache, k_new, v_new, positions, cos, sin)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Attention of one query token per sequence over its cache: q [B, H, D] -> [B, H, D] in q's dtype.

    Sequence b attends over slots [starts[b], lengths[b]) (starts skip left padding; lengths include the token
    just appended); an empty range gives zeros. GQA: query head h reads kv head h // (H // G). cos/sin [B, D]
    rotate q first. scale defaults to 1/sqrt(D). num_splits > 1 splits the slots into chunks merged by
    log-sum-exp (flash-decoding); <= 0 lets the kernel choose. The result does not depend on it beyond rounding.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.device.type in EXT_DEVICES:
        return torch.ops.mrlhf.decode_attention(q, k_cache, v_cache, starts, lengths, cos, sin, scale, num_splits)
    return reference.decode_attention(q, k_cache, v_cache, starts, lengths, cos, sin, scale, num_splits)


DECODE_LINEAR_MAX_ROWS = 32
"""Above this many rows BLAS is as fast (measured: parity at 64 rows, see csrc/decode_linear.cpp)."""


_CPU_KERNELS = "cpu" in EXT_DEVICES


def has_decode_linear(device: torch.device) -> bool:
    """Whether :func:`decode_linear` runs the compiled kernel for tensors on ``device`` (the CPU kernel only)."""
    return device.type == "cpu" and _CPU_KERNELS


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """residual + act(x [..., K] @ weight [N, K]^T + bias) -> [..., N], accumulated in fp32; ``activation`` is "none"
    or "gelu_tanh", ``residual`` has the output's shape. The compiled CPU kernel serves up to
    :data:`DECODE_LINEAR_MAX_ROWS` rows (the activation/residual epilogue in float32 only); larger inputs and other
    devices use ``torch.nn.functional.linear`` and torch ops (cuBLAS streams skinny products well on GPUs). Results
    agree with the torch ops to fp32 rounding, not bit for bit."""
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    epilogue = residual is not None or activation != "none"
    if (
        rows <= DECODE_LINEAR_MAX_ROWS
        and _CPU_KERNELS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and (not epilogue or x.dtype == torch.float32)
    ):
        n = weight.shape[0]
        res = None if residual is None else residual.reshape(rows, n).contiguous()
        out = torch.ops.mrlhf.decode_linear(
            x.reshape(rows, k).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), res,
            activation,
        )  # fmt: skip
        return out.view(*x.shape[:-1], n)
    out = torch.nn.functional.linear(x, weight, bias)
    if activation == "gelu_tanh":
        out = torch.nn.functional.gelu(out, approximate="tanh")
    elif activation != "none":
        raise ValueError(f"decode_linear: activation must be 'none' or 'gelu_tanh', got {activation!r}")
    return out if residual is None else residual + out


def row_softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, V] logits -> (row max [B] float32, lowest index of the max [B] int64, sum(exp(x - max)) [B] float32).

    exp(-inf) counts as exactly 0 (padding columns); a row holding a NaN gives NaN, like ``torch.max``. The compiled
    CPU kernel serves float32 logits on the CPU; everything else goes to the torch twin."""
    if _CPU_KERNELS and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.ops.mrlhf.row_softmax_stats(logits.contiguous())
    return reference.row_softmax_stats(logits)


def uniform_noise(seed: int, seq_ids: torch.Tensor, step: int, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """The Gumbel-max sampler's noise: U(0,1) float64 [B, vocab_size] on ``seq_ids``' device, a pure function of
    (seed, sequence id, step, global vocab id ``vocab_start + j``), so any TP layout or batching draws the same.

    The compiled CPU kernel returns the torch twin's values bit for bit (same hash, same rounding); other devices use
    the twin."""
    if _CPU_KERNELS and seq_ids.device.type == "cpu":
        return torch.ops.mrlhf.uniform_noise(seed, seq_ids.long(), step, vocab_start, vocab_size)
    return reference.uniform_noise(seed, seq_ids, step, vocab_start, vocab_size)
