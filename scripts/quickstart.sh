#!/usr/bin/env bash
# The main job on the embedded tiny model and data: set up, then SFT on the shipped arithmetic corpus.
# Extra arguments are dotted config overrides, e.g. `bash scripts/quickstart.sh training.train_steps=50`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PYTHONWARNINGS=ignore
.venv/bin/python -m mrlhf.cli sft --config configs/sft_tiny.yaml checkpoint.resume=false "$@"
echo "[quickstart] metrics: runs/sft_tiny/metrics.jsonl  checkpoints: runs/sft_tiny/checkpoints"
