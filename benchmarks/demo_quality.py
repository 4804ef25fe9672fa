"""Learning quality of the demo pipeline over seeds: SFT -> RM -> PPO (GAE) and GRPO, DPO; gold-judge scores.

GRPO also runs against the gold judge itself as a Python reward function (``grpo_verifier``: verifiable rewards, no
reward model), the ceiling of what the learned reward model lets PPO/GRPO reach.

    .venv/bin/python benchmarks/demo_quality.py --seeds 1 2 3 [--out runs/quality] [--json results.json]

Every stage of seed ``s`` runs with ``training.seed=s`` (weights, data order, dropout and -- for PPO -- the rollout
noise) into ``<out>/seed<s>/<stage>``, with the quickstart's configs. Prints per seed and the mean and spread
(sample std) of: SFT judge score, RM held-out pair accuracy, PPO / GRPO / DPO judge score, and PPO - SFT. The gold
judge scores greedy answers to the 200 held-out prompts (1 exact, 0.5 right number in the wrong format, 0 wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
PROMPTS = os.path.join(ROOT, "mrlhf", "assets", "demo", "prompts_eval.jsonl")


def run(args: list[str]) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([PY, "-m", "mrlhf.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: mrlhf {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def judge(ckpt: str, out: str, prompts: str = PROMPTS) -> float:
    run(["generate", "--checkpoint", ckpt, "--prompts", prompts, "--out", out, "generation.temperature=0"])
    from mrlhf.demo.score import score_file

    return score_file(out)["mean"]


def data_overrides(assets: str | None, train: str, eval_: str) -> list[str]:
    """Data paths of a stage when the run uses another asset directory (tools/make_demo_assets.py --out-dir)."""
    if assets is None:
        return []
    return [f"data.train_path={assets}/{train}", f"data.eval_path={assets}/{eval_}",
            f"data.tokenizer_path={assets}/tokenizer.model"]  # fmt: skip


def one_seed(seed: int, base: str, assets: str | None = None, skip: tuple[str, ...] = (),
             extra: dict[str, list[str]] | None = None, reuse: bool = False) -> dict[str, float]:  # fmt: skip
    d = os.path.join(base, f"seed{seed}")
    extra = extra or {}
    prompts = os.path.join(assets, "prompts_eval.jsonl") if assets else PROMPTS
    res: dict[str, float] = {}
    t0 = time.perf_counter()

    def train(name: str, stage: str, config: str, *more: str) -> None:
        """Run one stage into ``<d>/<name>``; with ``reuse``, a finished checkpoint there is kept (and judged)."""
        out = f"{d}/{name}"
        if reuse and os.path.exists(os.path.join(out, "checkpoints", "latest")):
            return
        run([stage, "--config", f"configs/{config}", f"training.seed={seed}", f"training.output_dir={out}", *more,
             *extra.get(name, [])])  # fmt: skip

    train("sft", "sft", "sft_demo.yaml", *data_overrides(assets, "sft_train.jsonl", "sft_eval.jsonl"))
    res["sft_judge"] = judge(f"{d}/sft/checkpoints", f"{d}/sft/eval.jsonl", prompts)
    train("rm", "rm", "rm_demo.yaml", f"checkpoint.load_dir={d}/sft/checkpoints",
          *data_overrides(assets, "pref_train.jsonl", "pref_eval.jsonl"))  # fmt: skip
    with open(f"{d}/rm/metrics.jsonl", encoding="utf-8") as f:
        res["rm_accuracy"] = [json.loads(line) for line in f][-1]["eval_accuracy"]
    grpo = ["ppo.estimator=grpo", "ppo.n_samples=4", "training.global_batch_size=16"]
    for name, more in (("ppo", [f"ppo.critic_load_dir={d}/rm/checkpoints"]),
                       ("grpo", [*grpo, f"ppo.critic_load_dir={d}/rm/checkpoints"]),
                       ("grpo_verifier", [*grpo, "ppo.critic_load_dir=null",  # the gold judge is the reward: no RM
                                          "ppo.reward_function=mrlhf.demo.judge:reward"])):  # fmt: skip
        if name in skip:
            continue
        train(name, "ppo", "ppo_demo.yaml", *more, f"ppo.actor_load_dir={d}/sft/checkpoints",
              *data_overrides(assets, "prompts_train.jsonl", "prompts_eval.jsonl"))  # fmt: skip
        res[f"{name}_judge"] = judge(f"{d}/{name}/checkpoints", f"{d}/{name}/eval.jsonl", prompts)
    if "dpo" not in skip:
        train("dpo", "dpo", "dpo_demo.yaml", f"checkpoint.load_dir={d}/sft/checkpoints",
              *data_overrides(assets, "pref_train.jsonl", "pref_eval.jsonl"))  # fmt: skip
        res["dpo_judge"] = judge(f"{d}/dpo/checkpoints", f"{d}/dpo/eval.jsonl", prompts)
    if "ppo" not in skip:
        res["ppo_minus_sft"] = res["ppo_judge"] - res["sft_judge"]
    res["minutes"] = (time.perf_counter() - t0) / 60
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--assets", help="demo data directory to use instead of mrlhf/assets/demo (made with "
                    "tools/make_demo_assets.py --out-dir)")  # fmt: skip
    ap.add_argument("--reuse", action="store_true", help="keep stages whose run directory already has a checkpoint "
                    "(same seed, same configs: the runs are deterministic on one machine) and only judge them")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ppo", "grpo", "grpo_verifier", "dpo"], help="stages to leave out")
    ap.add_argument("--set", nargs="*", default=[], metavar="STAGE:KEY=VALUE",
                    help="extra override for one stage (sft, rm, ppo, grpo, grpo_verifier, dpo), e.g. ppo:training.train_steps=300")
    ap.add_argument("--aggregate", nargs="+", help="summarise the --json files of earlier runs (e.g. one per seed, run "
                    "side by side with OMP_NUM_THREADS=1) instead of running")  # fmt: skip
    args = ap.parse_args()
    rows = {}
    if args.aggregate:
        for path in args.aggregate:
            with open(path, encoding="utf-8") as f:
                rows.update({int(k): v for k, v in json.load(f)["per_seed"].items()})
    for seed in [] if args.aggregate else args.seeds:
        extra: dict[str, list[str]] = {}
        for item in args.set:
            stage, _, override = item.partition(":")
            if stage not in ("sft", "rm", "ppo", "grpo", "grpo_verifier", "dpo") or "=" not in override:
                ap.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of sft, rm, ppo, grpo, "
                         "grpo_verifier, dpo")  # fmt: skip
            extra.setdefault(stage, []).append(override)
        rows[seed] = one_seed(seed, args.out, args.assets, tuple(args.skip), extra, args.reuse)
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.3f}" for k, v in rows[seed].items()), flush=True)
    for seed, row in sorted(rows.items()) if args.aggregate else []:
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    keys = list(next(iter(rows.values())))
    print(f"\n{len(rows)} seeds on {platform.processor() or platform.machine()}: mean (sample std, min, max)")
    summary = {}
    for k in keys:
        vals = [r[k] for r in rows.values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary[k] = {"mean": statistics.fmean(vals), "std": sd, "min": min(vals), "max": max(vals)}
        print(f"  {k:14s} {summary[k]['mean']:.3f} ({sd:.3f}, {min(vals):.3f}, {max(vals):.3f})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"per_seed": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
