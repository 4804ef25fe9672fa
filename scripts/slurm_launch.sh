#!/usr/bin/env bash
# The body of scripts/run_{sft,rm,ppo}_13b.sh (sourced; they set STAGE, CONFIG_DEFAULT and the role overrides).
#
# Outside a Slurm allocation the caller's script submits itself with sbatch (its #SBATCH lines size the job); inside
# it, srun starts one task per GPU and mrlhf reads its place from Slurm's variables (SLURM_PROCID, SLURM_LOCALID,
# the step's node list, a port from the job id: mrlhf/parallel/launch.py) -- no torchrun, no hostfile.
# --dry-run (anywhere, no Slurm needed): check the layout against the job's GPU count and print the plan (bytes per
# GPU by role and phase, `mrlhf plan`) and the srun line, then stop.
#
# Environment (all optional):
#   MRLHF_HOME      the repository (default: the one this file is in)
#   MRLHF_PYTHON    the interpreter with mrlhf installed (default: $MRLHF_HOME/.venv/bin/python)
#   CONFIG          the run file (default: configs/<stage>_13b.yaml)
#   NODES, GPUS_PER_NODE
#                   the job's size for --dry-run outside a job (default: the #SBATCH lines' 2 x 8); inside a job
#                   Slurm's SLURM_JOB_NUM_NODES / SLURM_NTASKS_PER_NODE are used
#   SRUN_ARGS       extra srun options (e.g. "--container-image=...")
# Any argument of the form section.key=value is passed to mrlhf as an override, after the script's own.
set -euo pipefail

dry_run=0
overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[1]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *=*) overrides+=("$arg") ;;
    *) echo "$(basename "${BASH_SOURCE[1]}"): unknown argument '$arg' (want --dry-run or section.key=value)" >&2; exit 2 ;;
  esac
done

caller="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")"  # before any cd: sbatch needs it
MRLHF_HOME="${MRLHF_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [[ ! -f "$MRLHF_HOME/mrlhf/cli.py" ]]; then
  echo "$(basename "${BASH_SOURCE[1]}"): MRLHF_HOME=$MRLHF_HOME is not the mrlhf repository (no mrlhf/cli.py); set MRLHF_HOME" >&2
  exit 2
fi
cd "$MRLHF_HOME"
py="${MRLHF_PYTHON:-$MRLHF_HOME/.venv/bin/python}"
if [[ ! -x "$py" ]]; then
  echo "$(basename "${BASH_SOURCE[1]}"): no interpreter at $py: run 'bash scripts/setup.sh' or set MRLHF_PYTHON" >&2
  exit 2
fi
config="${CONFIG:-$CONFIG_DEFAULT}"
[[ -f "$config" ]] || { echo "$(basename "${BASH_SOURCE[1]}"): config $config not found" >&2; exit 2; }

in_job=0
[[ -n "${SLURM_JOB_ID:-}" ]] && in_job=1
if (( in_job )); then
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  per_node="${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-8}}"
  per_node="${per_node%%(*}"  # "8(x2)" -> 8
else
  nodes="${NODES:-$SBATCH_NODES}"
  per_node="${GPUS_PER_NODE:-$SBATCH_GPUS_PER_NODE}"
fi
world=$(( nodes * per_node ))
# ${a[@]+"${a[@]}"}: an empty array under set -u (bash < 4.4 calls "${a[@]}" of an empty one unbound)
all=(${ROLE_OVERRIDES[@]+"${ROLE_OVERRIDES[@]}"} ${overrides[@]+"${overrides[@]}"})
cmd=("$py" -m mrlhf.cli "$STAGE" --config "$config" ${all[@]+"${all[@]}"})
# srun does not inherit sbatch's --cpus-per-task since Slurm 22.05: pass it on
srun_cmd=(srun --nodes="$nodes" --ntasks-per-node="$per_node" --kill-on-bad-exit=1 --cpu-bind=none --export=ALL
          ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"})

if (( dry_run )); then
  echo "[$STAGE] $nodes nodes x $per_node GPUs = $world processes; config $config"
  "$py" -m mrlhf.cli plan "$STAGE" --config "$config" --world "$world" ${all[@]+"${all[@]}"}
  echo "[$STAGE] would run: ${srun_cmd[*]} ${SRUN_ARGS:-} ${cmd[*]}"
  exit 0
fi

if (( ! in_job )); then  # not inside an allocation: submit this same script, which sbatch runs on the first node
  command -v sbatch >/dev/null || { echo "$(basename "${BASH_SOURCE[1]}"): not in a Slurm job and no sbatch here (use --dry-run to check a config)" >&2; exit 2; }
  exec sbatch --export=ALL,MRLHF_HOME="$MRLHF_HOME" "$caller" "$@"
fi

# The layout is checked and the per-GPU plan printed once, in the job's log, before N processes hold GPUs.
WORLD_SIZE=$world "$py" -m mrlhf.cli plan "$STAGE" --config "$config" --world "$world" ${all[@]+"${all[@]}"}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
echo "[$STAGE] job ${SLURM_JOB_ID}: ${srun_cmd[*]} ${SRUN_ARGS:-} ${cmd[*]}"
# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
exec "${srun_cmd[@]}" ${SRUN_ARGS:-} "${cmd[@]}"
