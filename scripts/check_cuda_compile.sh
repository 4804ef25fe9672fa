#!/usr/bin/env bash
# Compile csrc/kv_cache_cuda.cu with plain nvcc for sm_80 (A100) and sm_90 (H100): a cheap CI check of the CUDA
# kernels on machines without a GPU or a CUDA torch (the .cu file includes no torch headers).
# The -D__CUDA_NO_* flags are the ones torch's CUDAExtension adds, so the real build's constraints are checked too.
# Exits 0 with a message when nvcc is absent; non-zero when compilation fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: skipped, nvcc not installed"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
src="$root/csrc/kv_cache_cuda.cu"
nvcc -c -O3 -std=c++17 \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ \
  "$src" -o "$tmp/kv_cache_cuda.o"
echo "check_cuda_compile: ok, $(basename "$src") compiles for sm_80 and sm_90 ($(nvcc --version | tail -1))"
