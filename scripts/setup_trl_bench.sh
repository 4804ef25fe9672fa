#!/usr/bin/env bash
# Idempotent set-up of .venv-trl: the separate venv that runs TRL's side of benchmarks/ppo_vs_trl.py.
# TRL is a benchmark dependency only; the main .venv is never touched.
#
# Versions that worked (CPU, Python 3.11): torch 2.13.0+cpu, trl 0.29.1 (PPO in trl.experimental.ppo, GRPOTrainer
# in trl), transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0, tokenizers 0.23.3 (+ requests, which
# trl 0.29.1 imports but does not declare).
#   TRL_BENCH_TORCH_SPEC  overrides the torch requirement (default torch==2.13.0, installed FIRST so that
#                         trl/transformers do not pull a multi-GB CUDA torch).
#   TRL_BENCH_PYTHON      the interpreter that creates the venv (default: python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv-trl"
py="${TRL_BENCH_PYTHON:-python3}"
torch_spec="${TRL_BENCH_TORCH_SPEC:-torch==2.13.0}"
pkgs=(trl==0.29.1 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0 tokenizers==0.23.3 requests)

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup-trl] creating $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pip_q=(-q --disable-pip-version-check)

# Already complete? (same pins importable) -> nothing to do.
check='import torch, trl, transformers, accelerate, datasets, tokenizers, requests
from trl.experimental.ppo import PPOTrainer, PPOConfig
from trl import GRPOTrainer, GRPOConfig
print(torch.__version__, trl.__version__, transformers.__version__)'
if [ "${TRL_BENCH_FORCE:-0}" != 1 ] && vers="$(TRL_EXPERIMENTAL_SILENCE=1 PYTHONWARNINGS=ignore "$vpy" -c "$check" 2>/dev/null)" \
  && [ "$(echo "$vers" | cut -d' ' -f2-)" = "0.29.1 5.24.0" ]; then
  echo "[setup-trl] $venv ready (torch trl transformers: $vers)"
  exit 0
fi

# 1. torch first, then pin it so nothing below replaces it.
if ! torch_ver="$(PYTHONWARNINGS=ignore "$vpy" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  echo "[setup-trl] installing $torch_spec"
  "$vpy" -m pip install "${pip_q[@]}" "$torch_spec" numpy
  torch_ver="$("$vpy" -c 'import torch; print(torch.__version__)')"
fi
constraints="$venv/trl-bench-constraints.txt"
echo "torch==${torch_ver}" > "$constraints"

# 2. TRL and the HF stack it needs, with torch held fixed.
echo "[setup-trl] installing ${pkgs[*]} (torch held at $torch_ver)"
PIP_CONSTRAINT="$constraints" "$vpy" -m pip install "${pip_q[@]}" "${pkgs[@]}"

vers="$(TRL_EXPERIMENTAL_SILENCE=1 PYTHONWARNINGS=ignore "$vpy" -c "$check")"
echo "[setup-trl] $venv ready (torch trl transformers: $vers)"
