#!/usr/bin/env bash
# Download, here (with network), the wheels the GPU machine lacks into .gpu_wheels/ (git-ignored; carried to the device
# with run(carry=[".gpu_wheels"])): Python 3.12, manylinux x86_64, no torch (the device has a CUDA torch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.gpu_wheels"
mkdir -p "$dest"
pip="$root/.venv/bin/python -m pip"
common=(--dest "$dest" --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -q --disable-pip-version-check)
$pip download "${common[@]}" --no-deps "megatron-core>=0.16,<0.17" sentencepiece tokenizers safetensors pyyaml psutil \
  tqdm transformers huggingface-hub regex packaging filelock fsspec numpy "typing-extensions" hf-xet
du -sh "$dest"
ls "$dest"
