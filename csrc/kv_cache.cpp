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

// Tile helpers of decode_attention: scores of a tile of slots, their exponentials, and acc += sum_t p[t] * v[t].
// The AVX2/FMA versions are chosen at run time; exp is Cephes' expf polynomial (relative error ~2e-7), the same
// on every path so results do not depend on the machine beyond FMA rounding.
static inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  return std::ldexp(y, static_cast<int>(fx));
}

static void tile_scores_portable(const float* q, const float* const* k, int64_t T, int64_t D, float* s) {
  for (int64_t t = 0; t < T; ++t) s[t] = dot(q, k[t], D);
}
static void tile_exp_portable(float* s, int64_t T, float m) {
  for (int64_t t = 0; t < T; ++t) s[t] = exp_poly(s[t] - m);
}
static void tile_axpy_portable(const float* p, const float* const* v, int64_t T, int64_t D, float* acc) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) acc[d] += p[t] * v[t][d];
}

#if defined(__x86_64__) || defined(_M_X64)
#define MRLHF_TILE_X86 1
#include <immintrin.h>
#define MRLHF_AVX2 __attribute__((target("avx2,fma")))
MRLHF_AVX2 static inline float hsum8(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 0x55)));
}
MRLHF_AVX2 static void tile_scores_avx2(const float* q, const float* const* k, int64_t T, int64_t D, float* s) {
  const int64_t D8 = D - D % 8;
  for (int64_t t = 0; t < T; ++t) {
    const float* kr = k[t];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t d = 0;
    for (; d + 16 <= D8; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(kr + d + 8), a1);
    }
    for (; d < D8; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), a0);
    float sum = hsum8(_mm256_add_ps(a0, a1));
    for (; d < D; ++d) sum += q[d] * kr[d];
    s[t] = sum;
  }
}
MRLHF_AVX2 static void tile_exp_avx2(float* s, int64_t T, float m) {
  const __m256 hi = _mm256_set1_ps(88.3f), lo = _mm256_set1_ps(-87.3f), mv = _mm256_set1_ps(m);
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv), lo), hi);
    const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(s + t, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
  for (; t < T; ++t) s[t] = exp_poly(s[t] - m);
}
MRLHF_AVX2 static void tile_axpy_avx2(const float* p, const float* const* v, int64_t T, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 a = _mm256_loadu_ps(acc + d);
    for (int64_t t = 0; t < T; ++t) a = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v[t] + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
  for (; d < D; ++d)
    for (int64_t t = 0; t < T; ++t) acc[d] += p[t] * v[t][d];
}
static bool tile_avx2() { return cpu_isa() != CpuIsa::kPortable; }
#endif

static inline void tile_scores(const float* q, const float* const* k, int64_t T, int64_t D, float* s) {
#ifdef MRLHF_TILE_X86
  if (tile_avx2()) return tile_scores_avx2(q, k, T, D, s);
#endif
  tile_scores_portable(q, k, T, D, s);
}
static inline void tile_exp(float* s, int64_t T, float m) {
#ifdef MRLHF_TILE_X86
  if (tile_avx2()) return tile_exp_avx2(s, T, m);
#endif
  tile_exp_portable(s, T, m);
}
static inline void tile_axpy(const float* p, const float* const* v, int64_t T, int64_t D, float* acc) {
#ifdef MRLHF_TILE_X86
  if (tile_avx2()) return tile_axpy_avx2(p, v, T, D, acc);
#endif
  tile_axpy_portable(p, v, T, D, acc);
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

// Prefetch cache lines [first, last) of a tile: the tile's K slots are one contiguous block of `bytes` (slots
// j..j+T-1 of a sequence are adjacent in [B, L, G, D]), then its V block; lines are counted K first, then V.
// Into L2 (prefetcht1): a tile of K and V is larger than L1.
static inline void prefetch_tile(const char* k, const char* v, int64_t bytes, int64_t first, int64_t last) {
  const int64_t k_lines = (bytes + 63) / 64;
  for (int64_t i = first; i < last; ++i)
    __builtin_prefetch(i < k_lines ? k + i * 64 : v + (i - k_lines) * 64, 0, 2);
}

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
  // [G, D] row, so walking slots and then kv heads reads the cache sequentially (a task per (b, g) would stride
  // G * D elements between rows, which defeats the prefetcher). Each row is converted to fp32 once and used by
  // the R query heads that share it.
  at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), kbuf(kTile * D), vbuf(kTile * D), p(kTile);
    std::vector<const float*> krows(kTile), vrows(kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / S, s = task % S;
      const int64_t chunk = (hi[b] - lo[b] + S - 1) / S;
      const int64_t j0 = lo[b] + s * chunk, j1 = std::min(j0 + chunk, hi[b]);
      float* m = pm + b * H * S + s;  // head h's entries are h * S (m, l) and h * S * D (acc) apart
      float* l = pl + b * H * S + s;
      float* acc0 = pacc + (b * H * S + s) * D;
      for (int64_t h = 0; h < H; ++h) {  // q rows, rotated and pre-scaled; empty partials
        const scalar_t* qrow = qp + (b * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float x = cs ? rope_at(qrow, cs + b * D, sn + b * D, d, D) : static_cast<float>(qrow[d]);
          qf[h * D + d] = x * scale;
        }
        m[h * S] = -std::numeric_limits<float>::infinity();
        l[h * S] = 0.f;
        std::fill_n(acc0 + h * S * D, D, 0.f);
      }
      // Tiles of kTile slots: per kv head, convert the tile's rows to fp32 once (bf16/fp16), then for each query
      // head of the group: scores, one max, exponentials, and acc += p . V -- the online softmax per tile.
      for (int64_t j = j0; j < j1; j += kTile) {
        const int64_t T = std::min(kTile, j1 - j);
        // Cold caches (the common case: a step's weights evict them) stream at a fraction of the bandwidth unless
        // the rows are requested early. The next tile's K rows then V rows (each slot's row is G * D contiguous
        // elements) are requested in address order, a few cache lines per gathered row, so the requests are spread
        // evenly over this tile's work (a burst of a whole tile overflows the miss buffers) and stay one tile
        // ahead. The first tile of a task is requested up front.
        const int64_t slot_bytes = G * D * static_cast<int64_t>(sizeof(scalar_t));
        const char* k_tile = reinterpret_cast<const char*>(kc + (b * L + j) * G * D);
        const char* v_tile = reinterpret_cast<const char*>(vc + (b * L + j) * G * D);
        if (j == j0) prefetch_tile(k_tile, v_tile, T * slot_bytes, 0, 2 * ((T * slot_bytes + 63) / 64));
        const int64_t Tn = std::min(kTile, j1 - j - T), next_bytes = Tn * slot_bytes;
        const int64_t next_lines = 2 * ((next_bytes + 63) / 64), per_row = (next_lines + G * T - 1) / (G * T);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t t = 0; t < T; ++t) {
            const int64_t off = ((b * L + j + t) * G + g) * D;
            krows[t] = as_float(kc + off, kbuf.data() + t * D, D);
            vrows[t] = as_float(vc + off, vbuf.data() + t * D, D);
            const int64_t first = (g * T + t) * per_row;
            if (first < next_lines)
              prefetch_tile(k_tile + T * slot_bytes, v_tile + T * slot_bytes, next_bytes, first,
                            std::min(first + per_row, next_lines));
          }
          for (int64_t h = g * R; h < (g + 1) * R; ++h) {  // GQA: query heads g*R .. g*R+R-1 read kv head g
            float* acc = acc0 + h * S * D;
            tile_scores(qf.data() + h * D, krows.data(), T, D, p.data());
            const float tmax = *std::max_element(p.begin(), p.begin() + T);
            const float m_new = std::max(m[h * S], tmax);
            if (m_new > m[h * S]) {  // rescale the running sums only when the max moves; exp(-inf) = 0 at first
              const float alpha = m[h * S] == -std::numeric_limits<float>::infinity() ? 0.f : exp_poly(m[h * S] - m_new);
              l[h * S] *= alpha;
              for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
              m[h * S] = m_new;
            }
            tile_exp(p.data(), T, m_new);
            float sum = 0.f;
            for (int64_t t = 0; t < T; ++t) sum += p[t];
            l[h * S] += sum;
            tile_axpy(p.data(), vrows.data(), T, D, acc);
          }
        }
      }
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
