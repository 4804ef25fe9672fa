// mrlhf._C: decode_linear -- y = x @ weight^T + bias for the few rows of a decode step, on the CPU.
//
// A decode step multiplies M = batch (1..64) rows by every weight matrix of the model once. BLAS sgemm is built for
// large M: at M = 4..16 it streams the weights at a fraction of the memory bandwidth (measured 1.7 ms for an
// 8000 x 256 fp32 LM head whose weights are not in cache, ~5 GB/s, on a machine that reads 29 GB/s). This kernel
// walks the weight rows once, front to back (the hardware prefetcher's best case), and multiplies each pair of
// rows against all M inputs while they sit in L1: 2 weight rows x 4 inputs = 8 accumulators, 6 loads per 8 FMAs.
// Accumulation is fp32 for every dtype; bf16/fp16 outputs are rounded once at the end.
//
// x [M, K], weight [N, K] (nn.Linear layout), bias [N] or none, all contiguous and of one dtype -> y [M, N].
// Optional epilogue (float32 only), applied per thread to the output columns it just wrote while they are in cache:
//   y = residual + act(x @ weight^T + bias), act "none" or "gelu_tanh" (GPT-2's GELU, tanh form; tanh from the
//   shared exp polynomial, |error| < 1e-6), residual [M, N] or none. Saves the decode step's separate GELU and
//   bias-dropout-add passes (and their Python calls) where no all-reduce sits between the matmul and the add.
// The AVX2/FMA path is chosen at run time (__builtin_cpu_supports); other CPUs get the portable loop.
// mrlhf/ops/reference.py::decode_linear is the twin (fp32 matmul, then the output dtype).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MRLHF_X86 1
#endif

namespace mrlhf {
namespace {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Portable path: per (weight row, input row), 8 independent partial sums so the compiler can vectorise.
template <typename T>
void rows_portable(const float* x, const T* w, const T* bias, T* y, int64_t M, int64_t N, int64_t K, int64_t n0,
                   int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * K;
    const float b = bias ? to_float(bias[n]) : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += xr[k + j] * to_float(wr[k + j]);
      float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; k < K; ++k) s += xr[k] * to_float(wr[k]);
      y[m * N + n] = static_cast<T>(s + b);
    }
  }
}

#ifdef MRLHF_X86
constexpr int64_t kPrefetchBytes = 16384;  // ahead in the weight stream (AVX2 path; two rows of a pair are adjacent)
constexpr int64_t kPrefetchBlocks = 4;     // ahead in the weight stream, in blocks of rows (AVX-512 path)

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One weight row n against inputs [m0, m1): the tail of a row pair, or the last odd row. Four partial sums over k
// keep the FMA pipeline full when there is a single input (batch-1 decoding).
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void one_row_avx2(const float* x, const T* wr, float b, T* y, int64_t N,
                                                            int64_t K, int64_t n, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(xr + k), a0);
      a1 = _mm256_fmadd_ps(load8(wr + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(wr + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(wr + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(xr + k), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += xr[k] * to_float(wr[k]);
    y[m * N + n] = static_cast<T>(s + b);
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const float* x, const T* w, const T* bias, T* y, int64_t M,
                                                         int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t K8 = K - K % 8;
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const T* w0 = w + n * K;
    const T* w1 = w0 + K;
    const float b0 = bias ? to_float(bias[n]) : 0.f, b1 = bias ? to_float(bias[n + 1]) : 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      const float* x0 = x + m * K;
      const float* x1 = x0 + K;
      const float* x2 = x1 + K;
      const float* x3 = x2 + K;
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
      __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
      for (int64_t k = 0; k < K8; k += 8) {
        if (m == 0 && (k & 15) == 0) {  // one request per 64-byte line of each row (fp32), into L2
          _mm_prefetch(reinterpret_cast<const char*>(w0 + k) + kPrefetchBytes, _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(w1 + k) + kPrefetchBytes, _MM_HINT_T1);
        }
        const __m256 v0 = load8(w0 + k), v1 = load8(w1 + k);
        __m256 u = _mm256_loadu_ps(x0 + k);
        a00 = _mm256_fmadd_ps(v0, u, a00);
        a10 = _mm256_fmadd_ps(v1, u, a10);
        u = _mm256_loadu_ps(x1 + k);
        a01 = _mm256_fmadd_ps(v0, u, a01);
        a11 = _mm256_fmadd_ps(v1, u, a11);
        u = _mm256_loadu_ps(x2 + k);
        a02 = _mm256_fmadd_ps(v0, u, a02);
        a12 = _mm256_fmadd_ps(v1, u, a12);
        u = _mm256_loadu_ps(x3 + k);
        a03 = _mm256_fmadd_ps(v0, u, a03);
        a13 = _mm256_fmadd_ps(v1, u, a13);
      }
      float s[8] = {hsum8(a00), hsum8(a01), hsum8(a02), hsum8(a03), hsum8(a10), hsum8(a11), hsum8(a12), hsum8(a13)};
      for (int64_t k = K8; k < K; ++k) {
        const float f0 = to_float(w0[k]), f1 = to_float(w1[k]);
        s[0] += x0[k] * f0, s[1] += x1[k] * f0, s[2] += x2[k] * f0, s[3] += x3[k] * f0;
        s[4] += x0[k] * f1, s[5] += x1[k] * f1, s[6] += x2[k] * f1, s[7] += x3[k] * f1;
      }
      for (int j = 0; j < 4; ++j) {
        y[(m + j) * N + n] = static_cast<T>(s[j] + b0);
        y[(m + j) * N + n + 1] = static_cast<T>(s[4 + j] + b1);
      }
    }
    one_row_avx2(x, w0, b0, y, N, K, n, m, M);
    one_row_avx2(x, w1, b1, y, N, K, n + 1, m, M);
  }
  if (n < n1) one_row_avx2(x, w + n * K, bias ? to_float(bias[n]) : 0.f, y, N, K, n, 0, M);
}

// AVX-512 path: a block of R <= 4 weight rows x C <= 6 inputs keeps R * C accumulators (24 of the 32 zmm
// registers), so each weight vector loaded is used C times and each input vector R times: 10 loads per 24 FMAs,
// which leaves the FMA units as the limit (the AVX2 block above needs 6 loads per 8 FMAs). K tails are masked
// loads, not scalar loops. Every output is one dot product over K, reduced once at the end.
#define MRLHF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

MRLHF_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
MRLHF_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m256i raw = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
MRLHF_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

template <typename T, int R, int C>
MRLHF_AVX512 void block_avx512(const float* x, const T* w, const T* bias, T* y, int64_t N, int64_t K, int64_t n,
                               int64_t m, bool prefetch) {
  __m512 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const T* wr = w + n * K;
  const float* xr = x + m * K;
  // Prefetch the same position kPrefetchBlocks blocks on (block b + i starts i * R * K elements later) into L2:
  // prefetcht0 into L1 hides almost nothing here (measured on Zen 4: an 8000 x 256 fp32 head with cold weights at
  // M = 16 took 760 us with T0 at any distance, 500 us with T1, against 420 us when the weights sit in L3).
  const int64_t ahead = kPrefetchBlocks * R * K * static_cast<int64_t>(sizeof(T));
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wv[r] = load16(wr + r * K + k, mask);
      // the block ahead in address order: R lines per step of 16 columns cover R * K fp32 weights
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wr) + ahead + ((k / 16) * R + r) * 64, _MM_HINT_T1);
    }
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) {
      const __m512 u = _mm512_maskz_loadu_ps(mask, xr + c * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], u, acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float b = bias ? to_float(bias[n + r]) : 0.f;
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) y[(m + c) * N + n + r] = static_cast<T>(_mm512_reduce_add_ps(acc[r][c]) + b);
  }
}

template <typename T, int R>
MRLHF_AVX512 void rows_block_avx512(const float* x, const T* w, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                                    int64_t n) {
  // Inputs in blocks of at most 6, as even as possible (16 -> 6 5 5, 8 -> 4 4): small blocks reuse weights less.
  const int64_t blocks = (M + 5) / 6;
  int64_t m = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t c = (M - m) / (blocks - i);
    const bool first = i == 0;
    switch (c) {
      case 1: block_avx512<T, R, 1>(x, w, bias, y, N, K, n, m, first); break;
      case 2: block_avx512<T, R, 2>(x, w, bias, y, N, K, n, m, first); break;
      case 3: block_avx512<T, R, 3>(x, w, bias, y, N, K, n, m, first); break;
      case 4: block_avx512<T, R, 4>(x, w, bias, y, N, K, n, m, first); break;
      case 5: block_avx512<T, R, 5>(x, w, bias, y, N, K, n, m, first); break;
      default: block_avx512<T, R, 6>(x, w, bias, y, N, K, n, m, first); break;
    }
    m += c;
  }
}

// Weight rows [n0, n1) in blocks of 4 (the last block of the range may be shorter).
template <typename T>
MRLHF_AVX512 void rows_avx512(const float* x, const T* w, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                              int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows_block_avx512<T, 4>(x, w, bias, y, M, N, K, n);
  switch (n1 - n) {
    case 3: rows_block_avx512<T, 3>(x, w, bias, y, M, N, K, n); break;
    case 2: rows_block_avx512<T, 2>(x, w, bias, y, M, N, K, n); break;
    case 1: rows_block_avx512<T, 1>(x, w, bias, y, M, N, K, n); break;
    default: break;
  }
}
#endif

// ---- epilogue: y[m, n0:n1] = residual[m, n0:n1] + act(y[m, n0:n1]) ----
constexpr float kGeluBeta = 0.7978845608028654f;  // sqrt(2 / pi), as torch's gelu(approximate="tanh")
constexpr float kGeluKappa = 0.044715f;

inline float gelu_tanh_scalar(float v) {
  const float inner = kGeluBeta * (v + kGeluKappa * v * v * v);
  const float t = 1.f - 2.f / (exp_poly(2.f * inner) + 1.f);  // tanh(inner); exp_poly clamps, so |t| <= 1
  return 0.5f * v * (1.f + t);
}

void epilogue_portable(float* y, const float* r, int64_t len, bool gelu) {
  for (int64_t i = 0; i < len; ++i) {
    const float v = gelu ? gelu_tanh_scalar(y[i]) : y[i];
    y[i] = r ? r[i] + v : v;
  }
}

#ifdef MRLHF_X86
MRLHF_AVX512 void epilogue_avx512(float* y, const float* r, int64_t len, bool gelu) {
  const __m512 beta = _mm512_set1_ps(kGeluBeta), kappa = _mm512_set1_ps(kGeluKappa), one = _mm512_set1_ps(1.f);
  const __m512 two = _mm512_set1_ps(2.f), half = _mm512_set1_ps(0.5f);
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, y + i);
    if (gelu) {
      const __m512 inner = _mm512_mul_ps(beta, _mm512_fmadd_ps(_mm512_mul_ps(kappa, v), _mm512_mul_ps(v, v), v));
      const __m512 e = exp16_avx512(_mm512_mul_ps(two, inner));
      const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
      v = _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, t));
    }
    if (r) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, r + i), v);
    _mm512_mask_storeu_ps(y + i, m, v);
  }
}

__attribute__((target("avx2,fma,f16c"))) void epilogue_avx2(float* y, const float* r, int64_t len, bool gelu) {
  const __m256 beta = _mm256_set1_ps(kGeluBeta), kappa = _mm256_set1_ps(kGeluKappa), one = _mm256_set1_ps(1.f);
  const __m256 two = _mm256_set1_ps(2.f), half = _mm256_set1_ps(0.5f);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 v = _mm256_loadu_ps(y + i);
    if (gelu) {
      const __m256 inner = _mm256_mul_ps(beta, _mm256_fmadd_ps(_mm256_mul_ps(kappa, v), _mm256_mul_ps(v, v), v));
      const __m256 e = exp8_avx2(_mm256_mul_ps(two, inner));
      const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
      v = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t));
    }
    if (r) v = _mm256_add_ps(_mm256_loadu_ps(r + i), v);
    _mm256_storeu_ps(y + i, v);
  }
  epilogue_portable(y + i, r ? r + i : nullptr, len - i, gelu);
}
#endif

void epilogue(CpuIsa isa, float* y, const float* r, int64_t len, bool gelu) {
#ifdef MRLHF_X86
  if (isa == CpuIsa::kAvx512) return epilogue_avx512(y, r, len, gelu);
  if (isa == CpuIsa::kAvx2) return epilogue_avx2(y, r, len, gelu);
#endif
  epilogue_portable(y, r, len, gelu);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y,
         const float* residual, bool gelu) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // Inputs in fp32 once (M x K is tiny); the weights stay in their dtype and are converted as they stream by.
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  // Tasks are blocks of 4 weight rows, ~32k multiply-adds per task at least, so small layers do not pay for
  // waking threads.
  const int64_t blocks = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 4 * M * K));
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = 4 * b0, n1 = std::min(N, 4 * b1);
#ifdef MRLHF_X86
    if (isa == CpuIsa::kAvx512)
      rows_avx512<T>(xp, wp, bp, yp, M, N, K, n0, n1);
    else if (isa == CpuIsa::kAvx2)
      rows_avx2<T>(xp, wp, bp, yp, M, N, K, n0, n1);
    else
#endif
      rows_portable<T>(xp, wp, bp, yp, M, N, K, n0, n1);
    if constexpr (std::is_same_v<T, float>) {
      if (residual != nullptr || gelu)
        for (int64_t m = 0; m < M; ++m)
          epilogue(isa, yp + m * N + n0, residual ? residual + m * N + n0 : nullptr, n1 - n0, gelu);
    }
  });
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, c10::string_view activation) {
  const char* op = "decode_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be [N, ", x.size(1), "], got ",
              weight.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": expected float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(weight.scalar_type() == st, op, ": weight dtype ", weight.scalar_type(), " differs from x ", st);
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), op, ": x and weight must be contiguous");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [", weight.size(0),
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == st && bias->is_contiguous(), op, ": bias must be contiguous ", st);
  }
  TORCH_CHECK(activation == "none" || activation == "gelu_tanh", op,
              ": activation must be 'none' or 'gelu_tanh', got '", std::string(activation), "'");
  const bool gelu = activation == "gelu_tanh";
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == weight.size(0), op,
                ": residual must be [", x.size(0), ", ", weight.size(0), "], got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == st && residual->is_contiguous(), op, ": residual must be contiguous ", st);
  }
  TORCH_CHECK(st == at::kFloat || (!gelu && !residual.has_value()), op,
              ": the activation/residual epilogue is float32 only, got ", st);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (st == at::kFloat)
    run<float>(x, weight, bias, y, residual.has_value() ? residual->data_ptr<float>() : nullptr, gelu);
  else if (st == at::kBFloat16)
    run<c10::BFloat16>(x, weight, bias, y, nullptr, false);
  else
    run<c10::Half>(x, weight, bias, y, nullptr, false);
  return y;
}

}  // namespace mrlhf

TORCH_LIBRARY_FRAGMENT(mrlhf, m) {
  m.def(
      "decode_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual=None, str activation=\"none\") "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(mrlhf, CPU, m) { m.impl("decode_linear", &mrlhf::decode_linear_cpu); }
