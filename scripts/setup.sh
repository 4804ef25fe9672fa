#!/usr/bin/env bash
# Idempotent set-up: .venv, torch (pinned), megatron-core and the rest, mrlhf in editable mode with its C++ ops.
#   MRLHF_TORCH_SPEC  overrides the torch requirement (default: keep an importable torch, else torch==2.13.0
#                     on a machine without a CUDA GPU, else the newest torch that pip picks).
#   MRLHF_PYTHON      the interpreter that creates the venv (default: python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${MRLHF_PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pip_q=(-q --disable-pip-version-check)

# 1. torch: keep one that imports, else install the pinned one.
if torch_ver="$(PYTHONWARNINGS=ignore "$vpy" -c "import torch; print(torch.__version__)" 2>/dev/null)"; then
  echo "[setup] torch $torch_ver already importable; keeping it"
else
  if [ -n "${MRLHF_TORCH_SPEC:-}" ]; then
    spec="$MRLHF_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.6"
  else
    spec="torch==2.13.0"
  fi
  echo "[setup] installing $spec"
  "$vpy" -m pip install "${pip_q[@]}" "$spec" numpy
  torch_ver="$("$vpy" -c 'import torch; print(torch.__version__)')"
fi
# Pin torch so no later install upgrades it (megatron-core would otherwise pull a CUDA build).
constraints="$venv/mrlhf-constraints.txt"
echo "torch==${torch_ver}" > "$constraints"
export PIP_CONSTRAINT="$constraints"

# 2. Everything else, then mrlhf itself (builds mrlhf._C against the torch above).
stamp="$venv/.mrlhf-setup-stamp"
# the C++/CUDA sources are part of the stamp: a pull that changes csrc/ rebuilds mrlhf._C
want="$(cat setup.py pyproject.toml requirements-dev.txt csrc/* 2>/dev/null | sha1sum | cut -c1-40) $torch_ver"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing build tools, dev requirements and mrlhf (editable)"
  "$vpy" -m pip install "${pip_q[@]}" setuptools wheel pybind11 numpy
  "$vpy" -m pip install "${pip_q[@]}" -r requirements-dev.txt
  "$vpy" -m pip install "${pip_q[@]}" --no-build-isolation -e .
  echo "$want" > "$stamp"
else
  echo "[setup] dependencies up to date"
fi
PYTHONWARNINGS=ignore "$vpy" -c 'import mrlhf, torch, megatron.core; print(f"[setup] mrlhf {mrlhf.__version__} torch {torch.__version__} megatron-core {megatron.core.__version__}")'
