#!/usr/bin/env bash
# The main job on the embedded demo task (arithmetic with a gold judge), CPU, ~10 minutes on 2 cores:
#   1. SFT of a tiny LLaMA-style policy on sloppy demonstrations  -> judge score of its greedy answers
#   2. reward model on judge-labelled pairs (10% label noise)     -> held-out pair accuracy
#   3. PPO from the SFT policy against the reward model           -> judge score of its greedy answers
#   4. DPO from the SFT policy on the same pairs (offline)        -> judge score of its greedy answers
# Outputs go to runs/{sft,rm,ppo,dpo}_demo. Extra arguments are overrides for every stage (e.g. training.seed=7).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export PYTHONWARNINGS=ignore
py=.venv/bin/python
prompts=mrlhf/assets/demo/prompts_eval.jsonl
rm -rf runs/sft_demo runs/rm_demo runs/ppo_demo runs/dpo_demo

judge() {  # judge <checkpoint dir> <out jsonl>: greedy answers to the held-out prompts, scored by the gold judge
  "$py" -m mrlhf.cli generate --checkpoint "$1" --prompts "$prompts" --out "$2" generation.temperature=0 >/dev/null
  "$py" -m mrlhf.demo.score "$2"
}

echo "== 1/4 SFT"
"$py" -m mrlhf.cli sft --config configs/sft_demo.yaml "$@"
sft_score=$(judge runs/sft_demo/checkpoints runs/sft_demo/eval_generations.jsonl)
echo "[quickstart] SFT policy on 200 held-out prompts: $sft_score"

echo "== 2/4 reward model"
"$py" -m mrlhf.cli rm --config configs/rm_demo.yaml "$@"
rm_acc=$("$py" - <<'PY'
import json
last = [json.loads(line) for line in open("runs/rm_demo/metrics.jsonl")][-1]
print(f"{last['eval_accuracy']:.3f}")
PY
)
echo "[quickstart] reward model held-out pair accuracy: $rm_acc"

echo "== 3/4 PPO"
"$py" -m mrlhf.cli ppo --config configs/ppo_demo.yaml "$@"
ppo_score=$(judge runs/ppo_demo/checkpoints runs/ppo_demo/eval_generations.jsonl)
echo "[quickstart] PPO policy on 200 held-out prompts: $ppo_score"
ppo_curve=$("$py" - <<'PY'
import json
evals = [r for r in map(json.loads, open("runs/ppo_demo/metrics.jsonl")) if "eval_reward_mean" in r]
print(" -> ".join(f"{r['eval_reward_mean']:.3f} (it {r['iteration']})" for r in evals))
PY
)
echo "[quickstart] PPO held-out judge score during training: $ppo_curve"

echo "== 4/4 DPO"
"$py" -m mrlhf.cli dpo --config configs/dpo_demo.yaml "$@"
dpo_score=$(judge runs/dpo_demo/checkpoints runs/dpo_demo/eval_generations.jsonl)
echo
echo "[quickstart] SFT policy : $sft_score"
echo "[quickstart] RM accuracy: $rm_acc (held-out pairs)"
echo "[quickstart] PPO policy : $ppo_score  (during training: $ppo_curve)"
echo "[quickstart] DPO policy : $dpo_score"
