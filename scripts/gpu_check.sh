#!/usr/bin/env bash
# One-shot device check for a single-GPU machine (e.g. one H200, Python 3.12 with a CUDA torch, no network), at most
# ~8 minutes. Installs the wheels carried in .gpu_wheels/ (made here by scripts/gpu_wheels.sh), builds the CUDA
# extension, runs tests/gpu and tests/ext, then benchmarks/gpu_check.py: SFT, RM, DPO, PPO and generation steps on CUDA
# in fp32 and bf16, greedy tokens against HF generate, decode tokens/s of a 1.3B-shaped model at batch 1 and 64 against
# HF and the HBM roofline. Everything lands in one results file, $OUT/gpu_check.json (or ./gpu_check.json).
#
#   bash scripts/gpu_check.sh --dry-run   # on any machine: list the steps, check the inputs, in seconds
#   bash scripts/gpu_check.sh             # on the GPU machine
#
# From a session lent a device: run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root}"
wheels="$root/.gpu_wheels"
py="${MRLHF_PYTHON:-python3}"
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1

steps=(
  "install: pip install --no-index --find-links .gpu_wheels megatron-core sentencepiece tokenizers safetensors pyyaml psutil tqdm transformers"
  "build: pip install --no-build-isolation --no-deps -e . (mrlhf._C with the CUDA kernels)"
  "tests: pytest tests/gpu tests/ext (CUDA kernels parity, opcheck, both kv_append modes)"
  "stages: SFT, RM, DPO, PPO (GAE and GRPO) for a few steps on CUDA, fp32 and bf16, per-phase CUDA memory"
  "generate: mrlhf greedy tokens vs HF generate on the GPU (same exported weights)"
  "decode: tokens/s of a 1.3B-shaped model at batch 1 and 64, mrlhf vs HF vs the HBM roofline"
)
missing=0
for f in benchmarks/gpu_check.py configs/sft_tiny.yaml configs/ppo_demo.yaml tools/convert_mrlhf_to_hf.py tests/gpu; do
  [ -e "$f" ] || { echo "gpu_check: missing $f"; missing=1; }
done
for pkg in megatron_core sentencepiece tokenizers safetensors transformers; do
  if ! ls "$wheels"/${pkg}-*.whl >/dev/null 2>&1 && ! ls "$wheels"/${pkg//_/-}-*.whl >/dev/null 2>&1; then
    echo "gpu_check: no $pkg wheel in .gpu_wheels/ (run: bash scripts/gpu_wheels.sh)"
    missing=1
  fi
done
if [ "$dry" = 1 ]; then
  echo "gpu_check --dry-run: steps"
  for s in "${steps[@]}"; do echo "  - $s"; done
  "$py" benchmarks/gpu_check.py --dry-run || missing=1
  [ "$missing" = 0 ] && echo "gpu_check --dry-run: inputs ok" || echo "gpu_check --dry-run: inputs incomplete"
  exit "$missing"
fi
[ "$missing" = 0 ] || exit 2
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$(date +%s)
echo "== install"
"$py" -m pip install -q --no-index --find-links "$wheels" megatron-core sentencepiece tokenizers safetensors pyyaml \
  psutil tqdm transformers 2>&1 | tail -3
echo "== build"
"$py" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
"$py" -c 'import torch, mrlhf.ops.kv_ops as k; print(torch.__version__, torch.cuda.get_device_name(0), k.describe_backend())'
echo "== tests (gpu, ext)"
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/gpu tests/ext 2>&1 | tail -15 | tee "$out/gpu_tests.log"
echo "== stages, generation, decode speed"
timeout $((480 - ($(date +%s) - start))) "$py" benchmarks/gpu_check.py --out "$out/gpu_check.json"
echo "gpu_check: done in $(($(date +%s) - start)) s; results in $out/gpu_check.json"
