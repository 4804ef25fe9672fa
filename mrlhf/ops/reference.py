"""Pure-torch twin of the ``mrlhf._C`` operators (KV cache, decode matmul, sampler): the semantics, the test oracle and the fallback.

Same signatures as ``torch.ops.mrlhf.*``. Math is done in fp32 and rounded once to the tensors' dtype, which is
what the C++/CUDA kernels do, so fp32 results agree to rounding and bf16/fp16 ones to one ulp.
Shapes: B batch, L cache slots, G kv heads, H query heads (H % G == 0), D head dim (even for RoPE), T new tokens.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the last dim: megatron's non-interleaved RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in fp32 (cos/sin broadcast against x)."""
    x, cos, sin = x.float(), cos.float(), sin.float()
    return x * cos + rotate_half(x) * sin


def kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> None:
    """Write token t of sequence b at slot positions[b] + t, in place; keys are RoPE-rotated when cos/sin are given.

    k_cache/v_cache [B, L, G, D]; k_new/v_new [B, T, G, D]; positions int64 [B]; cos/sin [B, T, D].
    """
    B, L = k_cache.shape[:2]
    T = k_new.shape[1]
    if (cos is None) != (sin is None):
        raise RuntimeError("kv_append: pass both cos and sin, or neither")
    if bool(((positions < 0) | (positions + T > L)).any()):
        raise RuntimeError(
            f"kv_append: some sequence writes past the cache: positions {positions.tolist()} + T={T} must be <= L={L}"
        )
    if cos is not None:
        k_new = apply_rope(k_new, cos[:, :, None, :], sin[:, :, None, :]).to(k_cache.dtype)  # [B, T, 1, D] over G
    slots = positions[:, None] + torch.arange(T, device=positions.device)  # [B, T]
    rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
    k_cache[rows, slots] = k_new
    v_cache[rows, slots] = v_new


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    scale: float,
    num_splits: int = 0,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over slots [starts[b], lengths[b]) of each sequence; zeros for an empty range.

    q [B, H, D]; caches [B, L, G, D]; starts/lengths int64 [B]; cos/sin [B, D]. Query head h reads kv head
    h // (H // G). num_splits only changes how the kernels chunk the work, so it is ignored here.
    """
    B, H, D = q.shape
    L, G = k_cache.shape[1:3]
    qf = q.float() if cos is None else apply_rope(q, cos[:, None, :], sin[:, None, :])
    qf = qf.view(B, G, H // G, D)  # [B, H, D] -> [B, G, R, D]: the R query heads sharing a kv head
    scores = torch.einsum("bgrd,blgd->bgrl", qf, k_cache.float()) * scale  # [B, G, R, L]
    slot = torch.arange(L, device=q.device)
    valid = (slot >= starts[:, None]) & (slot < lengths[:, None])  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(valid.any(-1)[:, None, None, None], probs, 0.0)  # an empty range gives NaN -> zeros
    out = torch.einsum("bgrl,blgd->bgrd", probs, v_cache.float())
    return out.reshape(B, H, D).to(q.dtype)


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """residual + act(x [M, K] @ weight [N, K]^T + bias [N]) -> [M, N]: fp32 math, one rounding to x's dtype.
    ``activation`` is "none" or "gelu_tanh" (torch's gelu, tanh approximation); ``residual`` [M, N] or None."""
    if activation not in ("none", "gelu_tanh"):
        raise ValueError(f"decode_linear: activation must be 'none' or 'gelu_tanh', got {activation!r}")
    out = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if activation == "gelu_tanh":
        out = torch.nn.functional.gelu(out, approximate="tanh")
    if residual is not None:
        out = residual.float() + out
    return out.to(x.dtype)


def row_softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, V] float32 -> (row max [B], lowest index of the max [B] int64, sum(exp(x - max)) [B]). An all -inf row
    gives (-inf, 0, 0); a row holding a NaN gives (NaN, index of its first NaN, NaN), like torch.max."""
    x = logits.float()
    mx = x.max(dim=-1).values
    arg = torch.argmax(x, dim=-1)
    neg_inf = x == float("-inf")
    sumexp = torch.where(neg_inf, torch.zeros_like(x), torch.exp(x - mx[:, None])).sum(dim=-1)
    return mx, arg, sumexp


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Vectorised splitmix64 on int64 (wrapping arithmetic; logical shifts emulated with masks)."""

    def shr(v: torch.Tensor, n: int) -> torch.Tensor:
        return (v >> n) & ((1 << (64 - n)) - 1)

    x = x + (0x9E3779B97F4A7C15 - (1 << 64))
    x = (x ^ shr(x, 30)) * (0xBF58476D1CE4E5B9 - (1 << 64))
    x = (x ^ shr(x, 27)) * (0x94D049BB133111EB - (1 << 64))
    return x ^ shr(x, 31)


def uniform_noise(seed: int, seq_ids: torch.Tensor, step: int, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """U(0,1) float64 [B, vocab_size] on ``seq_ids``' device, a pure function of (seed, sequence id [B], step, global
    vocab id ``vocab_start + j``): the top 53 bits of a splitmix64 hash m, (m + 0.5) / 2^53. int64 math wraps."""
    vocab_ids = torch.arange(vocab_start, vocab_start + vocab_size, device=seq_ids.device)
    key = _splitmix64(_splitmix64(seq_ids.long() * 1_000_003 + seed) + step)  # [B]
    bits = _splitmix64(key[:, None] ^ vocab_ids[None, :])  # [B, V]
    mantissa = (bits >> 11) & ((1 << 53) - 1)  # 53 random bits
    return (mantissa.double() + 0.5) / float(1 << 53)
