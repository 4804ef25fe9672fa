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
// The AVX2/FMA path is chosen at run time (__builtin_cpu_supports); other CPUs get the portable loop.
// mrlhf/ops/reference.py::decode_linear is the twin (fp32 matmul, then the output dtype).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
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
constexpr int64_t kPrefetchBytes = 4096;  // ahead in the weight stream (two rows of a pair are adjacent)

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55)));
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
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(w0 + k) + kPrefetchBytes, _MM_HINT_T0);
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
      float s[8] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03), hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
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

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  // Inputs in fp32 once (M x K is tiny); the weights stay in their dtype and are converted as they stream by.
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  // ~32k multiply-adds per task at least, so small layers do not pay for waking threads.
  const int64_t grain = std::max<int64_t>(2, (32768 / std::max<int64_t>(1, M * K)) & ~int64_t(1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#ifdef MRLHF_X86
    if (have_avx2()) return rows_avx2<T>(xp, wp, bp, yp, M, N, K, n0, n1);
#endif
    rows_portable<T>(xp, wp, bp, yp, M, N, K, n0, n1);
  });
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
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
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (st == at::kFloat)
    run<float>(x, weight, bias, y);
  else if (st == at::kBFloat16)
    run<c10::BFloat16>(x, weight, bias, y);
  else
    run<c10::Half>(x, weight, bias, y);
  return y;
}

}  // namespace mrlhf

TORCH_LIBRARY_FRAGMENT(mrlhf, m) { m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(mrlhf, CPU, m) { m.impl("decode_linear", &mrlhf::decode_linear_cpu); }
