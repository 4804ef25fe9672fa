// Registers the CUDA kernels of kv_cache_cuda.cu as the CUDA implementations of the mrlhf ops.
//
// Compiled only when setup.py builds with a CUDA torch and toolkit (it then passes -DMRLHF_WITH_CUDA); in a CPU
// build this file is an empty translation unit. The kernels sit behind torch-free extern "C" launchers so the
// .cu file can be checked with plain nvcc; this file does the torch side: argument checks (shared with the CPU
// kernels), the device guard and stream, workspace allocation and the split count.

#ifdef MRLHF_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls in cuBLAS/cuSPARSE headers
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

extern "C" {
cudaError_t mrlhf_kv_append_cuda(int dtype, void* k_cache, void* v_cache, const void* k_new, const void* v_new,
                                 const int64_t* positions, const void* cos, const void* sin, int64_t B, int64_t L,
                                 int64_t T, int64_t G, int64_t D, cudaStream_t stream);
cudaError_t mrlhf_decode_attention_cuda(int dtype, const void* q, const void* k_cache, const void* v_cache,
                                        const int64_t* starts, const int64_t* lengths, const void* cos,
                                        const void* sin, float scale, int64_t B, int64_t H, int64_t G, int64_t L,
                                        int64_t D, int64_t S, float* ws_m, float* ws_l, float* ws_acc, void* out,
                                        cudaStream_t stream);
}

namespace mrlhf {
extern std::atomic<bool> g_debug_checks;  // kv_cache.cpp: set_debug_checks

// Defined in kv_cache.cpp.
void check_kv_append_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin);
void check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& starts, const at::Tensor& lengths, const std::optional<at::Tensor>& cos,
                       const std::optional<at::Tensor>& sin);

namespace {

// Must match DtypeCode in kv_cache_cuda.cu.
enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

int dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return kFloat32;
    case at::kBFloat16:
      return kBFloat16;
    case at::kHalf:
      return kFloat16;
    default:
      TORCH_CHECK(false, "mrlhf CUDA ops: unsupported dtype ", st);
  }
}

const void* opt_ptr(const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr() : nullptr; }

void kv_append_cuda(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                    const at::Tensor& positions, const std::optional<at::Tensor>& cos,
                    const std::optional<at::Tensor>& sin) {
  check_kv_append_args(k_cache, v_cache, k_new, v_new, positions, cos, sin);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t B = k_cache.size(0), L = k_cache.size(1), G = k_cache.size(2), D = k_cache.size(3);
  const int64_t T = k_new.size(1);
  // Same error as the CPU kernel, behind the debug switch (mrlhf::set_debug_checks): it costs one device->host
  // sync per call, i.e. per layer per decode step. Without it the kernel skips out-of-range slots, so memory stays
  // safe and the decode loop never waits for the host (nor breaks CUDA-graph capture).
  if (B > 0 && g_debug_checks.load(std::memory_order_relaxed)) {
    const bool bad = ((positions < 0) | (positions + T > L)).any().item<bool>();
    TORCH_CHECK(!bad, "kv_append: some sequence writes past the cache: positions + T must lie in [0, ", L,
                "] with T = ", T, ", got positions ", positions.cpu());
  }
  C10_CUDA_CHECK(mrlhf_kv_append_cuda(dtype_code(k_cache.scalar_type()), k_cache.data_ptr(), v_cache.data_ptr(),
                                      k_new.const_data_ptr(), v_new.const_data_ptr(),
                                      positions.const_data_ptr<int64_t>(), opt_ptr(cos), opt_ptr(sin), B, L, T, G, D,
                                      c10::cuda::getCurrentCUDAStream()));
}

// Auto split count from the cache capacity (reading the lengths would need a host sync): enough blocks for two
// waves over the SMs, at least ~256 slots per split. Any count gives the same result up to rounding.
int64_t auto_splits(int64_t B, int64_t H, int64_t L, c10::DeviceIndex device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::max<int64_t>(B * H, 1);
  const int64_t want = (2 * sms + blocks - 1) / blocks;
  return std::clamp<int64_t>(std::min(want, (L + 255) / 256), 1, 64);
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& starts, const at::Tensor& lengths,
                                 const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                                 double scale, int64_t num_splits) {
  check_decode_args(q, k_cache, v_cache, starts, lengths, cos, sin);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = k_cache.size(1), G = k_cache.size(2);
  TORCH_CHECK(D <= 512, "decode_attention (CUDA): head dim must be <= 512, got ", D);
  TORCH_CHECK(B <= 65535 && H <= 65535, "decode_attention (CUDA): batch and heads must be <= 65535 (grid limits)");
  int64_t S = num_splits > 0 ? num_splits : auto_splits(B, H, L, q.device().index());
  S = std::clamp<int64_t>(S, 1, std::max<int64_t>(std::min<int64_t>(L, 65535), 1));
  auto fopts = q.options().dtype(at::kFloat);
  at::Tensor ws_m = at::empty({B, H, S}, fopts), ws_l = at::empty({B, H, S}, fopts);
  at::Tensor ws_acc = at::empty({B, H, S, D}, fopts);
  at::Tensor out = at::empty_like(q);
  C10_CUDA_CHECK(mrlhf_decode_attention_cuda(
      dtype_code(q.scalar_type()), q.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
      starts.const_data_ptr<int64_t>(), lengths.const_data_ptr<int64_t>(), opt_ptr(cos), opt_ptr(sin),
      static_cast<float>(scale), B, H, G, L, D, S, ws_m.data_ptr<float>(), ws_l.data_ptr<float>(),
      ws_acc.data_ptr<float>(), out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace mrlhf

TORCH_LIBRARY_IMPL(mrlhf, CUDA, m) {
  m.impl("kv_append", &mrlhf::kv_append_cuda);
  m.impl("decode_attention", &mrlhf::decode_attention_cuda);
}

#endif  // MRLHF_WITH_CUDA
