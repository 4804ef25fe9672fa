"""SFT tokens/s of the tiny config at TP1 and TP2 (and any other layouts given), launched the way users launch.

Each layout runs ``torchrun --nproc-per-node N -m mrlhf.cli sft`` on configs/sft_tiny.yaml with checkpoints off and
reads tokens/s from its metrics file (mean over steps after a warm-up). Information only: on a 2-core CPU, TP adds
communication without adding compute, so TP2 is expected to be slower here; the number to watch on GPUs is scaling.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 30] [--layouts 1x1 2x1 1x2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tp: int, pp: int, steps: int, extra: list[str]) -> dict:
    world = tp * pp
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "mrlhf.cli", "sft", "--config", os.path.join(ROOT, "configs", "sft_tiny.yaml"),
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"training.train_steps={steps}", "training.eval_interval=0",
            "checkpoint.enabled=false", "logging.log_interval=1", "logging.progress_bar=false",
            "scheduler.warmup_steps=0", f"training.output_dir={out}", *extra,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), PYTHONWARNINGS="ignore")
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    steady = records[3:] or records
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "step_ms": 1000 * sum(r["step_time_s"] for r in steady) / len(steady),
        "final_loss": records[-1]["loss"],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1"], help="TPxPP pairs")
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = ap.parse_args()
    print(f"# sft_throughput  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"cores={os.cpu_count()}  steps={args.steps}")
    base = None
    print(f"{'layout':>8} {'tokens/s':>10} {'step ms':>9} {'vs 1x1':>7} {'loss':>7}")
    for layout in args.layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        r = run(tp, pp, args.steps, args.overrides)
        base = base or r["tokens_per_s"]
        print(f"{f'TP{tp}xPP{pp}':>8} {r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} "
              f"{r['tokens_per_s'] / base:>7.2f} {r['final_loss']:>7.3f}")


if __name__ == "__main__":
    main()
