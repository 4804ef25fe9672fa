#!/usr/bin/env bash
# SFT of a Llama-2-13B-shaped model on Slurm:
# 2 nodes x 8 GPUs, TP=8 within a node, PP=2 across nodes, bf16 (configs/sft_13b.yaml).
#
#   bash scripts/run_sft_13b.sh [section.key=value ...]            submits itself (sbatch) outside a job
#   sbatch scripts/run_sft_13b.sh [section.key=value ...]          the same, from the repository root
#   bash scripts/run_sft_13b.sh --dry-run [section.key=value ...]  layout check + bytes per GPU; no Slurm needed
#
# More nodes: sbatch --nodes=4 scripts/run_sft_13b.sh (the extra GPUs become data-parallel ranks; ZeRO-1 shards
# AdamW state over them). Inside the job srun starts one task per GPU; mrlhf reads Slurm's variables itself.
# Environment (optional; see scripts/slurm_launch.sh for the launcher's own: MRLHF_HOME, MRLHF_PYTHON, CONFIG, ...):
#   SFT_DATA, SFT_EVAL   SFT jsonl files (data.train_path / data.eval_path)
#   TOKENIZER            the sentencepiece model (data.tokenizer_path)
#   INIT                 the imported HF checkpoint to start from (checkpoint.load_dir; mrlhf convert import-hf)
#SBATCH --job-name=mrlhf-sft-13b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
STAGE=sft
CONFIG_DEFAULT=configs/sft_13b.yaml
SBATCH_NODES=2
SBATCH_GPUS_PER_NODE=8
ROLE_OVERRIDES=()  # each variable that is set becomes one override (spaces in paths kept)
[[ -n "${SFT_DATA:-}" ]] && ROLE_OVERRIDES+=("data.train_path=$SFT_DATA")
[[ -n "${SFT_EVAL:-}" ]] && ROLE_OVERRIDES+=("data.eval_path=$SFT_EVAL")
[[ -n "${TOKENIZER:-}" ]] && ROLE_OVERRIDES+=("data.tokenizer_path=$TOKENIZER")
[[ -n "${INIT:-}" ]] && ROLE_OVERRIDES+=("checkpoint.load_dir=$INIT")
[[ -n "${INIT:-}" || -n "${CONFIG:-}" ]] || echo "run_sft_13b.sh: INIT unset: the model starts from random weights (import HF weights first: docs/conversion.md)" >&2
self_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "$self_dir/slurm_launch.sh" ]]; then
  launcher="$self_dir/slurm_launch.sh"  # run from the repository
else  # sbatch runs a spooled copy: the repository is MRLHF_HOME (self-submitted) or where sbatch was called
  launcher="${MRLHF_HOME:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm_launch.sh"
fi
[[ -f "$launcher" ]] || { echo "$(basename "$0"): cannot find scripts/slurm_launch.sh; set MRLHF_HOME to the repository" >&2; exit 2; }
# shellcheck source=scripts/slurm_launch.sh
source "$launcher"
