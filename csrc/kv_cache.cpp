// mrlhf._C: KV-cache operators for rollout decoding. Schemas and CPU kernels.
//
//   kv_append        writes T new tokens per sequence into a preallocated [B, L, G, D] cache at
//                    slot positions[b] + t, rotating keys with RoPE on the way in.
//   decode_attention one query token per sequence attends over cache slots [starts[b], lengths[b]),
//                    flash-decoding style: split the slots into chunks, softmax each chunk, merge.
//
// mrlhf/ops/reference.py is the pure-torch twin that defines the semantics; the tests compare against it.
// CUDA kernels live in kv_cache_cuda.cu (torch-free) and are registered by kv_cache_cuda_binding.cpp.
// Only ATen + torch/library.h are included (no torch/extension.h / pybind11): the ops are reached through
// torch.ops.mrlhf, so the Python module itself is an empty stub (PyInit__C at the bottom).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_vec.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace mrlhf {

// ---------------------------------------------------------------------------------------------------------
// CPU vector-extension switch (csrc/cpu_isa.h)
// ---------------------------------------------------------------------------------------------------------

CpuIsa cpu_isa_supported() {
  static const CpuIsa best = [] {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    return avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kPortable;
#else
    return CpuIsa::kPortable;
#endif
  }();
  return best;
}

const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "portable";
}

static CpuIsa parse_isa(const std::string& name, const char* where) {
  CpuIsa isa;
  if (name == "best")
    return cpu_isa_supported();
  if (name == "avx512")
    isa = CpuIsa::kAvx512;
  else if (name == "avx2")
    isa = CpuIsa::kAvx2;
  else if (name == "portable")
    isa = CpuIsa::kPortable;
  else
    TORCH_CHECK(false, where, ": unknown CPU path '", name, "' (expected portable, avx2, avx512 or best)");
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(cpu_isa_supported()), where, ": this CPU has no ", name,
              " (best available: ", cpu_isa_name(cpu_isa_supported()), ")");
  return isa;
}

static std::atomic<int>& isa_state() {
  static std::atomic<int> state([] {
    const char* env = std::getenv("MRLHF_CPU_ISA");
    return static_cast<int>(env && *env ? parse_isa(env, "MRLHF_CPU_ISA") : cpu_isa_supported());
  }());
  return state;
}

CpuIsa cpu_isa() { return static_cast<CpuIsa>(isa_state().load(std::memory_order_relaxed)); }

// mrlhf::cpu_isa(str? use) -> str: switches the CPU kernels to `use` when given ("best": the best this CPU has);
// returns the path in use.
static std::string cpu_isa_op(std::optional<std::string> use) {
  if (use.has_value()) isa_state().store(static_cast<int>(parse_isa(*use, "mrlhf::cpu_isa")));
  return cpu_isa_name(cpu_isa());
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks, shared with the CUDA binding (declared again there) so both backends reject the same inputs.
// ---------------------------------------------------------------------------------------------------------

static void check_float_type(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": expected float32, bfloat16 or float16 tensors, got ", st);
}

static void check_rope_tables(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                              at::IntArrayRef shape, const at::Tensor& like, const char* op) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": pass both cos and sin, or neither");
  if (!cos.has_value()) return;
  for (const at::Tensor* t : {&*cos, &*sin}) {
    TORCH_CHECK(t->sizes() == shape, op, ": cos/sin must have shape ", shape, ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), op, ": cos/sin dtype ", t->scalar_type(),
                " differs from ", like.scalar_type());
    TORCH_CHECK(t->device() == like.device(), op, ": cos/sin are on ", t->device(), ", expected ", like.device());
    TORCH_CHECK(t->is_contiguous(), op, ": cos/sin must be contiguous");
  }
  TORCH_CHECK(shape.back() % 2 == 0, op, ": RoPE needs an even head dim, got ", shape.back());
}

static void check_index_vector(const at::Tensor& t, int64_t B, const at::Tensor& like, const char* what,
                               const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", what, " must have shape [", B, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", what, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", what, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

static void check_same(const at::Tensor& t, const at::Tensor& like, const char* what, const char* op) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", what, " dtype ", t.scalar_type(), " differs from ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", what, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

void check_kv_append_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin) {
  const char* op = "kv_append";
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [B, L, G, D], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " != k_cache ", k_cache.sizes());
  TORCH_CHECK(k_new.dim() == 4 && k_new.size(0) == k_cache.size(0) && k_new.size(2) == k_cache.size(2) &&
                  k_new.size(3) == k_cache.size(3),
              op, ": k_new must be [B, T, G, D] matching k_cache ", k_cache.sizes(), ", got ", k_new.sizes());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), op, ": v_new ", v_new.sizes(), " != k_new ", k_new.sizes());
  check_float_type(k_cache, op);
  TORCH_CHECK(k_cache.is_contiguous(), op, ": k_cache must be contiguous");
  check_same(v_cache, k_cache, "v_cache", op);
  check_same(k_new, k_cache, "k_new", op);
  check_same(v_new, k_cache, "v_new", op);
  check_index_vector(positions, k_cache.size(0), k_cache, "positions", op);
  check_rope_tables(cos, sin, {k_new.size(0), k_new.size(1), k_new.size(3)}, k_cache, op);
}

void check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& starts, const at::Tensor& lengths, const std::optional<at::Tensor>& cos,
                       const std::optional<at::Tensor>& sin) {
  const char* op = "decode_attention";
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(2), op,
              ": k_cache must be [B, L, G, D] matching q ", q.sizes(), ", got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " != k_cache ", k_cache.sizes());
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, op, ": query heads (", q.size(1),
              ") must be a multiple of kv heads (", k_cache.size(2), ")");
  check_float_type(q, op);
  TORCH_CHECK(q.is_contiguous(), op, ": q must be contiguous");
  check_same(k_cache, q, "k_cache", op);
  check_same(v_cache, q, "v_cache", op);
  check_index_vector(starts, q.size(0), q, "starts", op);
  check_index_vector(lengths, q.size(0), q, "lengths", op);
  check_rope_tables(cos, sin, {q.size(0), q.size(2)}, q, op);
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers. All math is fp32; bf16/fp16 are converted on load and rounded once on store.
// ---------------------------------------------------------------------------------------------------------

// Element d of k*cos + rotate_half(k)*sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]) (megatron's non-interleaved
// RoPE). Written as mul, mul, add (no FMA: -std=c++17 keeps GCC from contracting) so fp32 results are bit-equal
// to the torch reference and bf16 rounds identically.
template <typename scalar_t>
static inline float rope_at(const scalar_t* x, const scalar_t* cos, const scalar_t* sin, int64_t d, int64_t D) {
  const int64_t half = D / 2;
  const float partner = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
  const float a = static_cast<float>(x[d]) * static_cast<float>(cos[d]);
  const float b = partner * static_cast<float>(sin[d]);
  return a + b;
}

// fp32 view of a row: the row itself for float, else a converted copy in buf.
template <typename scalar_t>
static inline const float* as_float(const scalar_t* row, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);
    return buf;
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
  // 8 independent partial sums: lets the compiler keep them in vector registers without reassociating.
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  }
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Exponentials of a tile's scores for decode_attention's online softmax (csrc/cpu_vec.h: the same polynomial on
// every path, so results do not depend on the machine beyond FMA rounding).
static void tile_exp_portable(float* s, int64_t T, float m) {
  for (int64_t t = 0; t < T; ++t) s[t] = exp_poly(s[t] - m);
}
#if defined(__x86_64__) || defined(_M_X64)
#define MRLHF_TILE_X86 1
#include <immintrin.h>
#define MRLHF_AVX2 __attribute__((target("avx2,fma")))
MRLHF_AVX2 static void tile_exp_avx2(float* s, int64_t T, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) _mm256_storeu_ps(s + t, exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)));
  for (; t < T; ++t) s[t] = exp_poly(s[t] - m);
}
#endif

static inline void tile_exp(CpuIsa isa, float* s, int64_t T, float m) {
#ifdef MRLHF_TILE_X86
  if (isa != CpuIsa::kPortable) return tile_exp_avx2(s, T, m);
#endif
  tile_exp_portable(s, T, m);
}

// Slot-major helpers of decode_attention: one cache slot's row (all G kv heads, G * D contiguous elements) against
// every query head. scores: s[h * stride] = q_h . k_{g(h)}; axpy: acc_h += p[h * stride] * v_{g(h)}, acc_h = acc +
// h * D. Query head h reads kv head h / R.
static void row_scores_portable(const float* q, const float* row, int64_t H, int64_t R, int64_t D, float* s,
                                int64_t stride) {
  for (int64_t h = 0; h < H; ++h) s[h * stride] = dot(q + h * D, row + (h / R) * D, D);
}
static void row_axpy_portable(const float* p, const float* row, int64_t H, int64_t R, int64_t D, float* acc,
                              int64_t stride) {
  for (int64_t h = 0; h < H; ++h) {
    const float w = p[h * stride];
    const float* v = row + (h / R) * D;
    float* a = acc + h * D;
    for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
  }
}
#ifdef MRLHF_TILE_X86
#define MRLHF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
MRLHF_AVX2 static void row_scores_avx2(const float* q, const float* row, int64_t H, int64_t R, int64_t D, float* s,
                                       int64_t stride) {
  const int64_t D8 = D - D % 8;
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    const float* kr = row + (h / R) * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t d = 0;
    for (; d + 16 <= D8; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kr + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), _mm256_loadu_ps(kr + d + 8), a1);
    }
    for (; d < D8; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kr + d), a0);
    float sum = hsum8(_mm256_add_ps(a0, a1));
    for (; d < D; ++d) sum += qh[d] * kr[d];
    s[h * stride] = sum;
  }
}
MRLHF_AVX2 static void row_axpy_avx2(const float* p, const float* row, int64_t H, int64_t R, int64_t D, float* acc,
                                     int64_t stride) {
  for (int64_t h = 0; h < H; ++h) {
    const __m256 w = _mm256_set1_ps(p[h * stride]);
    const float* v = row + (h / R) * D;
    float* a = acc + h * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(a + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + d), _mm256_loadu_ps(a + d)));
    for (; d < D; ++d) a[d] += p[h * stride] * v[d];
  }
}
MRLHF_AVX512 static void row_scores_avx512(const float* q, const float* row, int64_t H, int64_t R, int64_t D,
                                           float* s, int64_t stride) {
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    const float* kr = row + (h / R) * D;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), _mm512_loadu_ps(kr + d), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d + 16), _mm512_loadu_ps(kr + d + 16), a1);
    }
    for (; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qh + d), _mm512_maskz_loadu_ps(m, kr + d), a0);
    }
    s[h * stride] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}
MRLHF_AVX512 static void row_axpy_avx512(const float* p, const float* row, int64_t H, int64_t R, int64_t D,
                                         float* acc, int64_t stride) {
  for (int64_t h = 0; h < H; ++h) {
    const __m512 w = _mm512_set1_ps(p[h * stride]);
    const float* v = row + (h / R) * D;
    float* a = acc + h * D;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
      const __m512 sum = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, v + d), _mm512_maskz_loadu_ps(m, a + d));
      _mm512_mask_storeu_ps(a + d, m, sum);
    }
  }
}
#endif

static inline void row_scores(CpuIsa isa, const float* q, const float* row, int64_t H, int64_t R, int64_t D, float* s,
                              int64_t stride) {
#ifdef MRLHF_TILE_X86
  if (isa == CpuIsa::kAvx512) return row_scores_avx512(q, row, H, R, D, s, stride);
  if (isa == CpuIsa::kAvx2) return row_scores_avx2(q, row, H, R, D, s, stride);
#endif
  row_scores_portable(q, row, H, R, D, s, stride);
}
static inline void row_axpy(CpuIsa isa, const float* p, const float* row, int64_t H, int64_t R, int64_t D, float* acc,
                            int64_t stride) {
#ifdef MRLHF_TILE_X86
  if (isa == CpuIsa::kAvx512) return row_axpy_avx512(p, row, H, R, D, acc, stride);
  if (isa == CpuIsa::kAvx2) return row_axpy_avx2(p, row, H, R, D, acc, stride);
#endif
  row_axpy_portable(p, row, H, R, D, acc, stride);
}

// ---------------------------------------------------------------------------------------------------------
// kv_append
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t>
static void kv_append_kernel(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new,
                             const at::Tensor& v_new, const int64_t* pos, const std::optional<at::Tensor>& cos,
                             const std::optional<at::Tensor>& sin) {
  const int64_t L = k_cache.size(1), G = k_cache.size(2), D = k_cache.size(3);
  const int64_t B = k_new.size(0), T = k_new.size(1), row = G * D;  // row = one token's [G, D]
  scalar_t* kc = k_cache.data_ptr<scalar_t>();
  scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const scalar_t* kn = k_new.const_data_ptr<scalar_t>();
  const scalar_t* vn = v_new.const_data_ptr<scalar_t>();
  const scalar_t* cs = cos ? cos->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sn = sin ? sin->const_data_ptr<scalar_t>() : nullptr;

  // One task per new token (b, t): its [G, D] block lands contiguously at slot pos[b] + t.
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const int64_t dst = (b * L + pos[b] + t) * row;
      std::memcpy(vc + dst, vn + bt * row, row * sizeof(scalar_t));
      if (cs == nullptr) {
        std::memcpy(kc + dst, kn + bt * row, row * sizeof(scalar_t));
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* src = kn + bt * row + g * D;
        for (int64_t d = 0; d < D; ++d) kc[dst + g * D + d] = scalar_t(rope_at(src, cs + bt * D, sn + bt * D, d, D));
      }
    }
  });
}

void kv_append_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                   const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                   const std::optional<at::Tensor>& sin) {
  check_kv_append_args(k_cache, v_cache, k_new, v_new, positions, cos, sin);
  const int64_t L = k_cache.size(1), T = k_new.size(1);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  // Writing past the cache would corrupt the neighbouring sequence, so this is an error, not a clamp.
  for (int64_t b = 0; b < positions.size(0); ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] + T <= L, "kv_append: sequence ", b, " writes slots [", pos[b], ", ",
                pos[b] + T, ") but the cache holds slots [0, ", L, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "kv_append_cpu", [&] {
    kv_append_kernel<scalar_t>(k_cache, v_cache, k_new, v_new, pos, cos, sin);
  });
}

// ---------------------------------------------------------------------------------------------------------
// decode_attention (flash-decoding split-K)
// ---------------------------------------------------------------------------------------------------------

// Auto split count: enough (b, split) tasks to feed every thread, but at least ~128 slots per split so the
// extra partials and the merge stay cheap. Any count gives the same result up to rounding.
static int64_t auto_splits(int64_t B, int64_t max_len) {
  const int64_t tasks = std::max<int64_t>(B, 1);
  const int64_t want = (2 * at::get_num_threads() + tasks - 1) / tasks;
  return std::clamp<int64_t>(std::min(want, max_len / 128), 1, 64);
}

constexpr int64_t kTile = 32;  // slots per softmax tile in decode_attention

constexpr int64_t kAhead = 8;  // decode_attention prefetches this many cache rows (slots) ahead of use

template <typename scalar_t>
static void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const std::vector<int64_t>& lo, const std::vector<int64_t>& hi,
                          const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, float scale,
                          int64_t S, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t L = k_cache.size(1), G = k_cache.size(2), R = H / G;  // R query heads share one kv head
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.const_data_ptr<scalar_t>();
  const scalar_t* cs = cos ? cos->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sn = sin ? sin->const_data_ptr<scalar_t>() : nullptr;

  // Per-(b, h, split) partials: running max m, sum of exp l, unnormalised output acc [D].
  auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ws_m = at::empty({B, H, S}, fopts), ws_l = at::empty({B, H, S}, fopts);
  at::Tensor ws_acc = at::empty({B, H, S, D}, fopts);
  float* pm = ws_m.data_ptr<float>();
  float* pl = ws_l.data_ptr<float>();
  float* pacc = ws_acc.data_ptr<float>();

  // Phase 1: one task per (b, split), covering all heads. Slot j's keys for all kv heads form one contiguous
  // [G, D] row and slots j..j+T-1 of a sequence are adjacent, so a tile is one contiguous block of K and one of V.
  // The tile is walked slot by slot (slot-major): the K block front to back giving every query head its score,
  // the softmax update per head, then the V block front to back adding p * v to every head's accumulator. The
  // cache is read strictly in address order (K tile, V tile, next K tile, ...), each row converted to fp32 once
  // and used by the R query heads that share it.
  const CpuIsa isa = cpu_isa();
  const int64_t row = G * D;
  const int64_t row_lines = (row * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64;
  at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), kbuf(row), vbuf(row), p(H * kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / S, s = task % S;
      const int64_t chunk = (hi[b] - lo[b] + S - 1) / S;
      const int64_t j0 = lo[b] + s * chunk, j1 = std::min(j0 + chunk, hi[b]);
      float* m = pm + b * H * S + s;  // head h's entries are h * S (m, l) and h * S * D (acc) apart
      float* l = pl + b * H * S + s;
      for (int64_t h = 0; h < H; ++h) {  // q rows, rotated and pre-scaled; empty partials
        const scalar_t* qrow = qp + (b * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float x = cs ? rope_at(qrow, cs + b * D, sn + b * D, d, D) : static_cast<float>(qrow[d]);
          qf[h * D + d] = x * scale;
        }
        m[h * S] = -std::numeric_limits<float>::infinity();
        l[h * S] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      // Cold caches (the common case: a step's weights evict them) stream at a fraction of the bandwidth unless
      // rows are requested ahead of use: kAhead rows on in the same address-ordered stream, into L2.
      auto prefetch_row = [&](const scalar_t* r) {
        for (int64_t i = 0; i < row_lines; ++i) __builtin_prefetch(reinterpret_cast<const char*>(r) + i * 64, 0, 2);
      };
      const scalar_t* kb = kc + b * L * row;
      const scalar_t* vb = vc + b * L * row;
      for (int64_t t = j0; t < std::min(j0 + kAhead, j1); ++t) prefetch_row(kb + t * row);
      for (int64_t j = j0; j < j1; j += kTile) {
        const int64_t T = std::min(kTile, j1 - j);
        for (int64_t t = 0; t < T; ++t) {  // K pass: every head's score of slot j + t
          const int64_t ahead = t + kAhead;  // the stream goes on with this tile's V rows
          prefetch_row(ahead < T ? kb + (j + ahead) * row : vb + (j + ahead - T) * row);
          const float* kr = as_float(kb + (j + t) * row, kbuf.data(), row);
          row_scores(isa, qf.data(), kr, H, R, D, p.data() + t, kTile);
        }
        for (int64_t h = 0; h < H; ++h) {  // online softmax update of head h over the tile
          float* ph = p.data() + h * kTile;
          const float tmax = *std::max_element(ph, ph + T);
          const float m_new = std::max(m[h * S], tmax);
          if (m_new > m[h * S]) {  // rescale the running sums only when the max moves; exp(-inf) = 0 at first
            const float alpha = m[h * S] == -std::numeric_limits<float>::infinity() ? 0.f : exp_poly(m[h * S] - m_new);
            l[h * S] *= alpha;
            for (int64_t d = 0; d < D; ++d) acc[h * D + d] *= alpha;
            m[h * S] = m_new;
          }
          tile_exp(isa, ph, T, m_new);
          float sum = 0.f;
          for (int64_t t = 0; t < T; ++t) sum += ph[t];
          l[h * S] += sum;
        }
        const int64_t Tn = std::min(kTile, j1 - j - T);  // the stream goes on with the next tile's K rows
        for (int64_t t = 0; t < T; ++t) {  // V pass: acc_h += p_h(j + t) * v(j + t)
          const int64_t ahead = t + kAhead;
          if (ahead < T)
            prefetch_row(vb + (j + ahead) * row);
          else if (ahead - T < Tn)
            prefetch_row(kb + (j + ahead) * row);
          const float* vr = as_float(vb + (j + t) * row, vbuf.data(), row);
          row_axpy(isa, p.data() + t, vr, H, R, D, acc.data(), kTile);
        }
      }
      for (int64_t h = 0; h < H; ++h) std::copy_n(acc.data() + h * D, D, pacc + ((b * H + h) * S + s) * D);
    }
  });

  // Phase 2: merge the splits of each (b, h) with the log-sum-exp rescale; empty ranges (all m = -inf) give 0.
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> w(S), num(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* m = pm + bh * S;
      const float* l = pl + bh * S;
      const float mx = *std::max_element(m, m + S);
      std::fill(num.begin(), num.end(), 0.f);
      float denom = 0.f;
      if (mx != -std::numeric_limits<float>::infinity()) {
        for (int64_t s = 0; s < S; ++s) {
          w[s] = std::exp(m[s] - mx);
          denom += w[s] * l[s];
          const float* acc = pacc + (bh * S + s) * D;
          for (int64_t d = 0; d < D; ++d) num[d] += w[s] * acc[d];
        }
      }
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t d = 0; d < D; ++d) op[bh * D + d] = scalar_t(num[d] * inv);
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& starts, const at::Tensor& lengths,
                                const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                                double scale, int64_t num_splits) {
  check_decode_args(q, k_cache, v_cache, starts, lengths, cos, sin);
  const int64_t B = q.size(0), L = k_cache.size(1);
  // Slot ranges are clamped to the cache (like the CUDA kernel, which cannot raise without a host sync).
  std::vector<int64_t> lo(B), hi(B);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    lo[b] = std::clamp<int64_t>(starts.const_data_ptr<int64_t>()[b], 0, L);
    hi[b] = std::max(lo[b], std::clamp<int64_t>(lengths.const_data_ptr<int64_t>()[b], 0, L));
    max_len = std::max(max_len, hi[b] - lo[b]);
  }
  int64_t S = num_splits > 0 ? num_splits : auto_splits(B, max_len);
  S = std::clamp<int64_t>(S, 1, std::max<int64_t>(L, 1));  // more splits than slots only adds empty partials
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_cpu", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, lo, hi, cos, sin, static_cast<float>(scale), S, out);
  });
  return out;
}

// Debug checks that cost a device->host sync per call on CUDA (the kv_append bounds check). Off by default: the
// CUDA kernel skips out-of-range slots, so memory stays safe without it; turn it on to get the error instead.
std::atomic<bool> g_debug_checks{false};

bool set_debug_checks_op(bool enabled) { return g_debug_checks.exchange(enabled); }

}  // namespace mrlhf

// Schemas. (a!)/(b!) mark the caches as mutated in place, which torch.compile/functionalization rely on.
TORCH_LIBRARY(mrlhf, m) {
  m.def(
      "kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor positions, "
      "Tensor? cos, Tensor? sin) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor starts, Tensor lengths, Tensor? cos, "
      "Tensor? sin, float scale, int num_splits) -> Tensor");
  m.def("cpu_isa(str? use=None) -> str", &mrlhf::cpu_isa_op);
  m.def("set_debug_checks(bool enabled) -> bool", &mrlhf::set_debug_checks_op);
}

TORCH_LIBRARY_IMPL(mrlhf, CPU, m) {
  m.impl("kv_append", &mrlhf::kv_append_cpu);
  m.impl("decode_attention", &mrlhf::decode_attention_cpu);
}

// `import mrlhf._C` only needs to run the static registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mrlhf custom ops (torch.ops.mrlhf)", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
