#!/usr/bin/env bash
# PPO of a Llama-2-13B-shaped chat model (actor/reference from SFT, critic/reward from the RM) on Slurm:
# 2 nodes x 8 GPUs, TP=8 within a node, PP=2 across nodes, bf16 (configs/ppo_13b.yaml).
#
#   bash scripts/run_ppo_13b.sh [section.key=value ...]            submits itself (sbatch) outside a job
#   sbatch scripts/run_ppo_13b.sh [section.key=value ...]          the same, from the repository root
#   bash scripts/run_ppo_13b.sh --dry-run [section.key=value ...]  layout check + bytes per GPU; no Slurm needed
#
# More nodes: sbatch --nodes=4 scripts/run_ppo_13b.sh (the extra GPUs become data-parallel ranks; ZeRO-1 shards
# AdamW state over them). Inside the job srun starts one task per GPU; mrlhf reads Slurm's variables itself.
# Environment (optional; see scripts/slurm_launch.sh for the launcher's own: MRLHF_HOME, MRLHF_PYTHON, CONFIG, ...):
#   PROMPTS              prompt jsonl (data.train_path)
#   TOKENIZER            the sentencepiece model (data.tokenizer_path)
#   SFT_CKPT, RM_CKPT    the SFT and RM checkpoints (ppo.actor_load_dir / ppo.critic_load_dir; the reference and
#                        reward roles follow them; default runs/sft_13b/checkpoints, runs/rm_13b/checkpoints)
#SBATCH --job-name=mrlhf-ppo-13b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
STAGE=ppo
CONFIG_DEFAULT=configs/ppo_13b.yaml
SBATCH_NODES=2
SBATCH_GPUS_PER_NODE=8
ROLE_OVERRIDES=()  # each variable that is set becomes one override (spaces in paths kept)
[[ -n "${PROMPTS:-}" ]] && ROLE_OVERRIDES+=("data.train_path=$PROMPTS")
[[ -n "${TOKENIZER:-}" ]] && ROLE_OVERRIDES+=("data.tokenizer_path=$TOKENIZER")
[[ -n "${SFT_CKPT:-}" ]] && ROLE_OVERRIDES+=("ppo.actor_load_dir=$SFT_CKPT")
[[ -n "${RM_CKPT:-}" ]] && ROLE_OVERRIDES+=("ppo.critic_load_dir=$RM_CKPT")
self_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "$self_dir/slurm_launch.sh" ]]; then
  launcher="$self_dir/slurm_launch.sh"  # run from the repository
else  # sbatch runs a spooled copy: the repository is MRLHF_HOME (self-submitted) or where sbatch was called
  launcher="${MRLHF_HOME:-${SLURM_SUBMIT_DIR:-.}}/scripts/slurm_launch.sh"
fi
[[ -f "$launcher" ]] || { echo "$(basename "$0"): cannot find scripts/slurm_launch.sh; set MRLHF_HOME to the repository" >&2; exit 2; }
# shellcheck source=scripts/slurm_launch.sh
source "$launcher"
