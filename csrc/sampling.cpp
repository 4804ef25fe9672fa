// mrlhf._C: row_softmax_stats -- what greedy sampling needs from a [B, V] block of fp32 logits, in two passes over
// each row: the row max, the first index holding it, and sum(exp(x - max)).
//
// The sampler used to spend five torch ops on this (max, sub, exp, sum, plus the temporaries), ~0.4 ms per decode
// step at batch 16 x vocab 8000 on two cores; this is one call. Under tensor parallelism each rank passes its vocab
// slice and the sampler merges (max, sumexp) pairs across ranks (mrlhf/generation/sampling.py).
//   max:    NaN if the row holds a NaN (like torch.max), -inf for an all -inf row;
//   argmax: the lowest index of the max (the first NaN for a NaN row);
//   sumexp: 0 for an all -inf row (exp(-inf) is taken as exactly 0), NaN for a NaN row.
// mrlhf/ops/reference.py::row_softmax_stats is the twin.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
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

}  // namespace mrlhf

TORCH_LIBRARY_FRAGMENT(mrlhf, m) { m.def("row_softmax_stats(Tensor logits) -> (Tensor, Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(mrlhf, CPU, m) { m.impl("row_softmax_stats", &mrlhf::row_softmax_stats_cpu); }
