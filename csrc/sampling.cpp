// mrlhf._C: the sampler's CPU kernels (mrlhf/generation/sampling.py); mrlhf/ops/reference.py holds their twins.
//
// row_softmax_stats -- what greedy sampling needs from a [B, V] block of fp32 logits, in two passes over each row:
// the row max, the first index holding it, and sum(exp(x - max)).
// The sampler used to spend five torch ops on this (max, sub, exp, sum, plus the temporaries), ~0.4 ms per decode
// step at batch 16 x vocab 8000 on two cores; this is one call. Under tensor parallelism each rank passes its vocab
// slice and the sampler merges (max, sumexp) pairs across ranks.
//   max:    NaN if the row holds a NaN (like torch.max), -inf for an all -inf row;
//   argmax: the lowest index of the max (the first NaN for a NaN row);
//   sumexp: 0 for an all -inf row (exp(-inf) is taken as exactly 0), NaN for a NaN row.
//
// uniform_noise -- the U(0,1) noise [B, V] float64 of Gumbel-max sampling, a counter-based hash of (seed, sequence
// id, step, global vocab id), bit for bit what the torch twin computes: splitmix64 in wrapping 64-bit arithmetic,
// the top 53 bits m of the hash, (m + 0.5) / 2^53 in double. Every path gives the same bits: the u64 -> double
// conversion is exact (m < 2^53), the + 0.5 is one IEEE add (it rounds to even above 2^52, as torch's does) and the
// scale is a power of two. The twin spends ~17 int64/double torch ops over [B, V] temporaries on it; this is one
// pass. The Gumbel transform -log(-log(u)) stays in torch: torch's double log comes from a vector math library
// (MKL VML or SLEEF, by build) and differs from libm's log in the last bit for ~0.1% of u (measured), so a log here
// could not promise the same samples.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace mrlhf {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// The sum of exponentials is taken in fp32 over chunks of this many columns and the chunks' sums in double, so its
// error stays at a few fp32 ulps for any vocabulary (one fp32 running sum over 8000 columns drifts ~1e-5).
constexpr int64_t kChunk = 256;

struct RowStats {
  float max;
  int64_t arg;
  float sumexp;
};

// Rows holding a NaN: the first NaN, like torch.max.
bool nan_row(const float* x, int64_t V, RowStats& out) {
  for (int64_t i = 0; i < V; ++i) {
    if (std::isnan(x[i])) {
      out = {x[i], i, std::numeric_limits<float>::quiet_NaN()};
      return true;
    }
  }
  return false;
}

RowStats row_portable(const float* x, int64_t V) {
  RowStats r{kNegInf, 0, 0.f};
  if (nan_row(x, V, r)) return r;
  for (int64_t i = 0; i < V; ++i)
    if (x[i] > r.max) r.max = x[i], r.arg = i;
  if (r.max == kNegInf) return r;
  double total = 0.0;
  for (int64_t c = 0; c < V; c += kChunk) {
    float part = 0.f;
    for (int64_t i = c; i < std::min(V, c + kChunk); ++i) part += x[i] == kNegInf ? 0.f : exp_poly(x[i] - r.max);
    total += part;
  }
  r.sumexp = static_cast<float>(total);
  return r;
}

#if defined(__x86_64__) || defined(_M_X64)
#define MRLHF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define MRLHF_AVX2 __attribute__((target("avx2,fma")))

MRLHF_AVX512 RowStats row_avx512(const float* x, int64_t V) {
  RowStats r{kNegInf, 0, 0.f};
  __m512 vmax = _mm512_set1_ps(kNegInf);
  __m512i vidx = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = V - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (V - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), m, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strict: a lane keeps its first max
    vmax = _mm512_mask_blend_ps(gt, vmax, v);
    vidx = _mm512_mask_blend_epi32(gt, vidx, cur);
    cur = _mm512_add_epi32(cur, _mm512_set1_epi32(16));
  }
  if (nan && nan_row(x, V, r)) return r;
  r.max = _mm512_reduce_max_ps(vmax);
  if (r.max == kNegInf) return r;  // arg 0, sumexp 0
  const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(r.max), _CMP_EQ_OQ);
  r.arg = _mm512_mask_reduce_min_epi32(at_max, vidx);  // the lowest index among lanes holding the max
  const __m512 mv = _mm512_set1_ps(r.max), ninf = _mm512_set1_ps(kNegInf);
  double total = 0.0;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t e = std::min(V, c + kChunk);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = c; i < e; i += 16) {
      const __mmask16 m = e - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (e - i)) - 1);
      const __m512 a = _mm512_mask_loadu_ps(ninf, m, x + i);
      // exp(-inf) must be 0, not the clamped polynomial's 1e-38: those lanes are left out
      acc = _mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(a, ninf, _CMP_NEQ_OQ), acc, exp16_avx512(_mm512_sub_ps(a, mv)));
    }
    total += _mm512_reduce_add_ps(acc);
  }
  r.sumexp = static_cast<float>(total);
  return r;
}

MRLHF_AVX2 RowStats row_avx2(const float* x, int64_t V) {
  RowStats r{kNegInf, 0, 0.f};
  if (nan_row(x, V, r)) return r;
  // max: vector pass, then the first index holding it (a second, early-exiting scan)
  __m256 vmax = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  for (float l : lanes) r.max = std::max(r.max, l);
  for (; i < V; ++i) r.max = std::max(r.max, x[i]);
  if (r.max == kNegInf) return r;
  while (x[r.arg] != r.max) ++r.arg;
  const __m256 mv = _mm256_set1_ps(r.max), ninf = _mm256_set1_ps(kNegInf);
  double total = 0.0;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t e = std::min(V, c + kChunk);
    __m256 acc = _mm256_setzero_ps();
    for (i = c; i + 8 <= e; i += 8) {
      const __m256 a = _mm256_loadu_ps(x + i);
      const __m256 keep = _mm256_cmp_ps(a, ninf, _CMP_NEQ_OQ);
      acc = _mm256_add_ps(acc, _mm256_and_ps(keep, exp8_avx2(_mm256_sub_ps(a, mv))));
    }
    _mm256_storeu_ps(lanes, acc);
    float part = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; i < e; ++i) part += x[i] == kNegInf ? 0.f : exp_poly(x[i] - r.max);
    total += part;
  }
  r.sumexp = static_cast<float>(total);
  return r;
}
#endif

// ---- uniform_noise ----

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull, kMul1 = 0xBF58476D1CE4E5B9ull, kMul2 = 0x94D049BB133111EBull;
constexpr double kTwoM53 = 1.0 / 9007199254740992.0;  // 2^-53

inline uint64_t splitmix64(uint64_t x) {
  x += kGolden;
  x = (x ^ (x >> 30)) * kMul1;
  x = (x ^ (x >> 27)) * kMul2;
  return x ^ (x >> 31);
}

inline double noise_one(uint64_t key, uint64_t vocab_id) {
  return (static_cast<double>(splitmix64(key ^ vocab_id) >> 11) + 0.5) * kTwoM53;
}

// One row: out[j] = noise(key, v0 + j), j < V.
void noise_row_portable(uint64_t key, uint64_t v0, int64_t V, double* out) {
  for (int64_t j = 0; j < V; ++j) out[j] = noise_one(key, v0 + static_cast<uint64_t>(j));
}

#if defined(__x86_64__) || defined(_M_X64)
#define MRLHF_AVX512DQ __attribute__((target("avx512f,avx512dq")))

// AVX-512DQ has the 64-bit multiply (vpmullq) and the exact u64 -> double conversion (vcvtuqq2pd).
MRLHF_AVX512DQ void noise_row_avx512(uint64_t key, uint64_t v0, int64_t V, double* out) {
  const __m512i k = _mm512_set1_epi64(static_cast<long long>(key)), step = _mm512_set1_epi64(8);
  const __m512i golden = _mm512_set1_epi64(static_cast<long long>(kGolden));
  const __m512i m1 = _mm512_set1_epi64(static_cast<long long>(kMul1));
  const __m512i m2 = _mm512_set1_epi64(static_cast<long long>(kMul2));
  const __m512d half = _mm512_set1_pd(0.5), scale = _mm512_set1_pd(kTwoM53);
  __m512i id = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(v0)),
                                _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t j = 0; j < V; j += 8) {
    __m512i x = _mm512_add_epi64(_mm512_xor_si512(k, id), golden);
    x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 30)), m1);
    x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 27)), m2);
    x = _mm512_srli_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 31)), 11);
    const __m512d u = _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu64_pd(x), half), scale);
    const __mmask8 m = V - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (V - j)) - 1);
    _mm512_mask_storeu_pd(out + j, m, u);
    id = _mm512_add_epi64(id, step);
  }
}

// x * c mod 2^64 from 32 x 32 -> 64-bit products (AVX2 has no 64-bit multiply); c_lo/c_hi: c's halves per lane.
MRLHF_AVX2 inline __m256i mul64_avx2(__m256i x, __m256i c_lo, __m256i c_hi) {
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x, 32), c_lo), _mm256_mul_epu32(x, c_hi));
  return _mm256_add_epi64(_mm256_mul_epu32(x, c_lo), _mm256_slli_epi64(cross, 32));
}

MRLHF_AVX2 void noise_row_avx2(uint64_t key, uint64_t v0, int64_t V, double* out) {
  const __m256i k = _mm256_set1_epi64x(static_cast<long long>(key)), step = _mm256_set1_epi64x(4);
  const __m256i golden = _mm256_set1_epi64x(static_cast<long long>(kGolden));
  const __m256i m1_lo = _mm256_set1_epi64x(kMul1 & 0xFFFFFFFFull), m1_hi = _mm256_set1_epi64x(kMul1 >> 32);
  const __m256i m2_lo = _mm256_set1_epi64x(kMul2 & 0xFFFFFFFFull), m2_hi = _mm256_set1_epi64x(kMul2 >> 32);
  // m < 2^53 to double, exactly: (2^84 + hi * 2^32) - (2^84 + 2^52) + (2^52 + lo), each term built from its bits
  const __m256i lo_mask = _mm256_set1_epi64x(0xFFFFFFFFll);
  const __m256i exp52 = _mm256_set1_epi64x(0x4330000000000000ll), exp84 = _mm256_set1_epi64x(0x4530000000000000ll);
  const __m256d bias = _mm256_set1_pd(0x1.00000001p84);  // 2^84 + 2^52
  const __m256d half = _mm256_set1_pd(0.5), scale = _mm256_set1_pd(kTwoM53);
  __m256i id = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(v0)), _mm256_setr_epi64x(0, 1, 2, 3));
  int64_t j = 0;
  for (; j + 4 <= V; j += 4) {
    __m256i x = _mm256_add_epi64(_mm256_xor_si256(k, id), golden);
    x = mul64_avx2(_mm256_xor_si256(x, _mm256_srli_epi64(x, 30)), m1_lo, m1_hi);
    x = mul64_avx2(_mm256_xor_si256(x, _mm256_srli_epi64(x, 27)), m2_lo, m2_hi);
    x = _mm256_srli_epi64(_mm256_xor_si256(x, _mm256_srli_epi64(x, 31)), 11);
    const __m256d hi = _mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64(x, 32), exp84));
    const __m256d lo = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(x, lo_mask), exp52));
    const __m256d m = _mm256_add_pd(_mm256_sub_pd(hi, bias), lo);
    _mm256_storeu_pd(out + j, _mm256_mul_pd(_mm256_add_pd(m, half), scale));
    id = _mm256_add_epi64(id, step);
  }
  noise_row_portable(key, v0 + static_cast<uint64_t>(j), V - j, out + j);
}

bool has_avx512dq() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_softmax_stats_cpu(const at::Tensor& logits) {
  const char* op = "row_softmax_stats";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [B, V], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits have no columns");
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor mx = at::empty({B}, logits.options()), sums = at::empty({B}, logits.options());
  at::Tensor arg = at::empty({B}, logits.options().dtype(at::kLong));
  const float* x = logits.const_data_ptr<float>();
  float* pm = mx.data_ptr<float>();
  float* ps = sums.data_ptr<float>();
  int64_t* pa = arg.data_ptr<int64_t>();
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      RowStats r;
#if defined(__x86_64__) || defined(_M_X64)
      if (isa == CpuIsa::kAvx512)
        r = row_avx512(x + b * V, V);
      else if (isa == CpuIsa::kAvx2)
        r = row_avx2(x + b * V, V);
      else
#endif
        r = row_portable(x + b * V, V);
      pm[b] = r.max, pa[b] = r.arg, ps[b] = r.sumexp;
    }
  });
  return {mx, arg, sums};
}

at::Tensor uniform_noise_cpu(int64_t seed, const at::Tensor& seq_ids, int64_t step, int64_t vocab_start,
                             int64_t vocab_size) {
  const char* op = "uniform_noise";
  TORCH_CHECK(seq_ids.dim() == 1, op, ": seq_ids must be [B], got ", seq_ids.sizes());
  TORCH_CHECK(seq_ids.scalar_type() == at::kLong, op, ": seq_ids must be int64, got ", seq_ids.scalar_type());
  TORCH_CHECK(vocab_size >= 0, op, ": vocab_size must be >= 0, got ", vocab_size);
  const at::Tensor ids = seq_ids.contiguous();
  const int64_t B = ids.size(0), V = vocab_size;
  at::Tensor out = at::empty({B, V}, ids.options().dtype(at::kDouble));
  if (B == 0 || V == 0) return out;
  const int64_t* pid = ids.const_data_ptr<int64_t>();
  double* po = out.data_ptr<double>();
  // int64 wraps like torch's: the arithmetic is done on the same bits as uint64
  const uint64_t useed = static_cast<uint64_t>(seed), ustep = static_cast<uint64_t>(step);
  const uint64_t v0 = static_cast<uint64_t>(vocab_start);
  const CpuIsa isa = cpu_isa();
#if defined(__x86_64__) || defined(_M_X64)
  const bool avx512 = isa == CpuIsa::kAvx512 && has_avx512dq();  // the AVX-512 path needs DQ on top of F/BW/VL
#endif
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t key = splitmix64(splitmix64(static_cast<uint64_t>(pid[b]) * 1000003ull + useed) + ustep);
      double* row = po + b * V;
#if defined(__x86_64__) || defined(_M_X64)
      if (avx512)
        noise_row_avx512(key, v0, V, row);
      else if (isa >= CpuIsa::kAvx2)
        noise_row_avx2(key, v0, V, row);
      else
#endif
        noise_row_portable(key, v0, V, row);
    }
  });
  return out;
}

}  // namespace mrlhf

TORCH_LIBRARY_FRAGMENT(mrlhf, m) {
  m.def("row_softmax_stats(Tensor logits) -> (Tensor, Tensor, Tensor)");
  m.def("uniform_noise(int seed, Tensor seq_ids, int step, int vocab_start, int vocab_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(mrlhf, CPU, m) {
  m.impl("row_softmax_stats", &mrlhf::row_softmax_stats_cpu);
  m.impl("uniform_noise", &mrlhf::uniform_noise_cpu);
}
