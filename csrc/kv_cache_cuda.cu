// CUDA kernels for mrlhf's KV-cache ops (see kv_cache.cpp for the semantics and reference.py for the twin).
//
// Torch-free on purpose: raw pointers, sizes and a cudaStream_t behind extern "C" launchers. That lets plain
// `nvcc -c` check this file where torch is a CPU build (scripts/check_cuda_compile.sh); the torch glue
// (checks, workspace allocation, stream, registration) lives in kv_cache_cuda_binding.cpp.
// Only explicit conversion intrinsics are used for bf16/fp16, so it also builds under the
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ flags that torch's CUDAExtension adds.
// All tensors are contiguous; offsets are int64 because B * L * G * D can pass 2^31.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

// Must match DtypeCode in kv_cache_cuda_binding.cpp.
enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kWarpSize = 32;
constexpr int kDecodeWarps = 4;  // warps per decode block; each walks every kDecodeWarps-th slot of the split

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Element d of x*cos + rotate_half(x)*sin (megatron's non-interleaved RoPE: rotate_half(x) = cat(-x2, x1)).
// __fmul_rn/__fadd_rn keep nvcc from fusing into an FMA, so results round exactly like the torch reference.
template <typename T>
__device__ __forceinline__ float rope_at(const T* x, const T* cos, const T* sin, int64_t d, int64_t D) {
  const int64_t half = D / 2;
  const float partner = d < half ? -to_float(x[d + half]) : to_float(x[d - half]);
  return __fadd_rn(__fmul_rn(to_float(x[d]), to_float(cos[d])), __fmul_rn(partner, to_float(sin[d])));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// kv_append: one thread per element of k_new/v_new, grid-stride. Memory-bound, so the flat layout (coalesced
// reads and writes along D) is all that matters. Out-of-range slots are skipped rather than written: the
// binding has already raised for them, this only keeps a bad call from corrupting memory.
// ---------------------------------------------------------------------------------------------------------

template <typename T>
__global__ void kv_append_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k_new,
                                 const T* __restrict__ v_new, const int64_t* __restrict__ positions,
                                 const T* __restrict__ cos, const T* __restrict__ sin, int64_t L, int64_t T_new,
                                 int64_t G, int64_t D, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t d = i % D, g = (i / D) % G, bt = i / (D * G);  // element i of [B, T, G, D]
    const int64_t b = bt / T_new, t = bt % T_new;
    const int64_t slot = positions[b] + t;
    if (slot < 0 || slot >= L) continue;
    const int64_t dst = ((b * L + slot) * G + g) * D + d;
    v_cache[dst] = v_new[i];
    k_cache[dst] = cos == nullptr ? k_new[i]
                                  : from_float<T>(rope_at(k_new + (bt * G + g) * D, cos + bt * D, sin + bt * D, d, D));
  }
}

// ---------------------------------------------------------------------------------------------------------
// decode_attention, flash-decoding split-K.
//
// Pass 1 (decode_split_kernel): one block per (split, query head, batch). The split's slots are dealt to the
// block's warps round-robin; for each slot a warp computes q.k with lanes across D and a shuffle reduction,
// then does an online-softmax update of its own (m, l, acc). The warps are merged in shared memory and the
// block writes one partial (m, l, acc[D]) to the fp32 workspace [B, H, S(, D)].
// Pass 2 (decode_combine_kernel): one block per (b, h) merges its S partials with the log-sum-exp rescale.
// Lane `lane` owns head-dim elements lane, lane + 32, ... so q and acc stay in registers: kPerLane = ceil(D/32),
// a template parameter so the per-lane arrays are fully unrolled.
// ---------------------------------------------------------------------------------------------------------

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kDecodeWarps* kWarpSize)
    decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                        const int64_t* __restrict__ starts, const int64_t* __restrict__ lengths,
                        const T* __restrict__ cos, const T* __restrict__ sin, float scale, int H, int G, int64_t L,
                        int D, int S, float* __restrict__ ws_m, float* __restrict__ ws_l,
                        float* __restrict__ ws_acc) {
  const int split = blockIdx.x, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int g = h / (H / G);  // GQA: query head h reads kv head h / (H / G)
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  // This split's slots: [starts, lengths) clamped to the cache (a kernel cannot raise), cut into S chunks.
  const int64_t lo = min(max(starts[b], (int64_t)0), L);
  const int64_t hi = max(lo, min(max(lengths[b], (int64_t)0), L));
  const int64_t chunk = (hi - lo + S - 1) / S;
  const int64_t j0 = lo + split * chunk, j1 = min(j0 + chunk, hi);

  // q row, rotated and pre-scaled, spread over the lanes.
  const T* qrow = q + (b * H + h) * D;
  float qr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    float x = 0.f;
    if (d < D) x = cos == nullptr ? to_float(qrow[d]) : rope_at(qrow, cos + b * D, sin + b * D, d, D);
    qr[i] = x * scale;
    acc[i] = 0.f;
  }

  float m = -INFINITY, l = 0.f;
  for (int64_t j = j0 + warp; j < j1; j += kDecodeWarps) {  // warp-uniform loop: full-mask shuffles are safe
    const T* krow = k_cache + ((b * L + j) * G + g) * D;
    const T* vrow = v_cache + ((b * L + j) * G + g) * D;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      if (d < D) s += qr[i] * to_float(krow[d]);
    }
    s = warp_sum(s);
    if (s > m) {  // online softmax: rescale only when the max moves (exp(-inf) = 0 on the first slot)
      const float alpha = expf(m - s);
      l *= alpha;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] *= alpha;
      m = s;
    }
    const float p = expf(s - m);
    l += p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarpSize;
      if (d < D) acc[i] += p * to_float(vrow[d]);
    }
  }

  // Merge the warps' partials; a warp that saw no slot has m = -inf and weight 0.
  __shared__ float sm_m[kDecodeWarps], sm_l[kDecodeWarps];
  __shared__ float sm_acc[kDecodeWarps][kPerLane * kWarpSize];
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sm_acc[warp][lane + i * kWarpSize] = acc[i];
  __syncthreads();

  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm_m[w]);
  float weight[kDecodeWarps];
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) weight[w] = sm_m[w] == -INFINITY ? 0.f : expf(sm_m[w] - mx);

  const int64_t part = (b * H + h) * S + split;
  if (threadIdx.x == 0) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) sum += weight[w] * sm_l[w];
    ws_m[part] = mx;
    ws_l[part] = sum;
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) v += weight[w] * sm_acc[w][d];
    ws_acc[part * D + d] = v;
  }
}

template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ ws_m, const float* __restrict__ ws_l,
                                      const float* __restrict__ ws_acc, int S, int D, T* __restrict__ out) {
  const int64_t bh = blockIdx.x;
  const float* m = ws_m + bh * S;
  const float* l = ws_l + bh * S;
  // Every thread recomputes the S weights (S <= 64, cached loads): cheaper than a shared-memory round trip.
  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, m[s]);
  float denom = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < S; ++s) denom += expf(m[s] - mx) * l[s];
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;  // empty slot range -> zeros
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f;
    if (mx != -INFINITY) {
      for (int s = 0; s < S; ++s) num += expf(m[s] - mx) * ws_acc[(bh * S + s) * D + d];
    }
    out[bh * D + d] = from_float<T>(num * inv);
  }
}

template <typename T>
cudaError_t launch_append(void* k_cache, void* v_cache, const void* k_new, const void* v_new, const int64_t* positions,
                          const void* cos, const void* sin, int64_t B, int64_t L, int64_t T_new, int64_t G,
                          int64_t D, cudaStream_t stream) {
  const int64_t n = B * T_new * G * D;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads < (1 << 20) ? (n + threads - 1) / threads : (1 << 20);
  kv_append_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(
      static_cast<T*>(k_cache), static_cast<T*>(v_cache), static_cast<const T*>(k_new), static_cast<const T*>(v_new),
      positions, static_cast<const T*>(cos), static_cast<const T*>(sin), L, T_new, G, D, n);
  return cudaGetLastError();
}

template <typename T, int kPerLane>
cudaError_t launch_decode_d(const void* q, const void* k_cache, const void* v_cache, const int64_t* starts,
                            const int64_t* lengths, const void* cos, const void* sin, float scale, int64_t B,
                            int64_t H, int64_t G, int64_t L, int64_t D, int64_t S, float* ws_m, float* ws_l,
                            float* ws_acc, void* out, cudaStream_t stream) {
  const dim3 grid((unsigned)S, (unsigned)H, (unsigned)B);
  decode_split_kernel<T, kPerLane><<<grid, kDecodeWarps * kWarpSize, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), starts, lengths,
      static_cast<const T*>(cos), static_cast<const T*>(sin), scale, (int)H, (int)G, L, (int)D, (int)S, ws_m, ws_l,
      ws_acc);
  decode_combine_kernel<T><<<(unsigned)(B * H), 128, 0, stream>>>(ws_m, ws_l, ws_acc, (int)S, (int)D,
                                                                  static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode(const void* q, const void* k_cache, const void* v_cache, const int64_t* starts,
                          const int64_t* lengths, const void* cos, const void* sin, float scale, int64_t B, int64_t H,
                          int64_t G, int64_t L, int64_t D, int64_t S, float* ws_m, float* ws_l, float* ws_acc,
                          void* out, cudaStream_t stream) {
#define MRLHF_DECODE_D(PER_LANE)                                                                                  \
  return launch_decode_d<T, PER_LANE>(q, k_cache, v_cache, starts, lengths, cos, sin, scale, B, H, G, L, D, S, ws_m, \
                                      ws_l, ws_acc, out, stream)
  if (D <= 2 * kWarpSize) MRLHF_DECODE_D(2);
  if (D <= 4 * kWarpSize) MRLHF_DECODE_D(4);
  if (D <= 8 * kWarpSize) MRLHF_DECODE_D(8);
  if (D <= 16 * kWarpSize) MRLHF_DECODE_D(16);
#undef MRLHF_DECODE_D
  return cudaErrorInvalidValue;  // head dim > 512: the binding rejects it first
}

}  // namespace

extern "C" {

// Writes k_new/v_new [B, T, G, D] into k_cache/v_cache [B, L, G, D] at slot positions[b] + t, RoPE-rotating keys
// when cos/sin [B, T, D] are non-null. positions is a device int64 [B]. Asynchronous on `stream`.
cudaError_t mrlhf_kv_append_cuda(int dtype, void* k_cache, void* v_cache, const void* k_new, const void* v_new,
                                 const int64_t* positions, const void* cos, const void* sin, int64_t B, int64_t L,
                                 int64_t T, int64_t G, int64_t D, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return launch_append<float>(k_cache, v_cache, k_new, v_new, positions, cos, sin, B, L, T, G, D, stream);
    case kBFloat16:
      return launch_append<__nv_bfloat16>(k_cache, v_cache, k_new, v_new, positions, cos, sin, B, L, T, G, D, stream);
    case kFloat16:
      return launch_append<__half>(k_cache, v_cache, k_new, v_new, positions, cos, sin, B, L, T, G, D, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// out [B, H, D] = softmax(q . k * scale) . v over slots [starts[b], lengths[b]) with S splits (1 <= S <= 65535).
// ws_m/ws_l hold B*H*S floats and ws_acc B*H*S*D floats of scratch. D <= 512. Asynchronous on `stream`.
cudaError_t mrlhf_decode_attention_cuda(int dtype, const void* q, const void* k_cache, const void* v_cache,
                                        const int64_t* starts, const int64_t* lengths, const void* cos,
                                        const void* sin, float scale, int64_t B, int64_t H, int64_t G, int64_t L,
                                        int64_t D, int64_t S, float* ws_m, float* ws_l, float* ws_acc, void* out,
                                        cudaStream_t stream) {
  if (B * H == 0 || D == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32:
      return launch_decode<float>(q, k_cache, v_cache, starts, lengths, cos, sin, scale, B, H, G, L, D, S, ws_m, ws_l,
                                  ws_acc, out, stream);
    case kBFloat16:
      return launch_decode<__nv_bfloat16>(q, k_cache, v_cache, starts, lengths, cos, sin, scale, B, H, G, L, D, S,
                                          ws_m, ws_l, ws_acc, out, stream);
    case kFloat16:
      return launch_decode<__half>(q, k_cache, v_cache, starts, lengths, cos, sin, scale, B, H, G, L, D, S, ws_m,
                                   ws_l, ws_acc, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // extern "C"
