"""Seconds per PPO iteration and per GRPO step: mrlhf against TRL's trainers, same tiny model, same batch.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--algos ppo,grpo] [--iterations 5] [--warmup 1] [--threads 2] [--json]

TRL runs in its own venv (``bash scripts/setup_trl_bench.sh`` makes .venv-trl; TRL is a benchmark dependency only)
as a subprocess, ``.venv-trl/bin/python benchmarks/trl_side.py``; mrlhf runs in this process through
``mrlhf_side``. The two sides run one after the other, never together. Shared shape (``SHAPE``): GPT-2 shaped,
4 layers, hidden 256, 4 heads, vocab 8000, random init, no dropout, fp32 on CPU, ``torch.set_num_threads(2)``;
random prompts of exactly 32 tokens, exactly 64 sampled tokens per response (no early stop), temperature 1;
PPO: 16 prompts x 1 response per iteration, 1 epoch, 1 minibatch, KL 0.05 (k1, in the reward), GAE gamma 1 lambda 0.95,
critic + random reward model; GRPO: 16 completions per step = 4 prompts x 4 samples, 1 epoch, 1 minibatch, KL 0.05 to
the reference, a trivial python reward. benchmarks/trl_side.py's docstring lists what one TRL iteration contains.

The table: algo, mrlhf s/iter, TRL s/iter (medians over the timed iterations), TRL/mrlhf (> 1: mrlhf is faster),
each side's share of the iteration spent generating, and the floor: the iteration's matmul FLOPs (``iteration_flops``)
over this CPU's measured fp32 matmul rate at the same shapes (``matmul_rate``: whole-sequence passes at their row
count, decode steps at one row per sequence), with TRL/floor, the largest speed-up over TRL that any implementation
doing the same work could show. ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRL_PYTHON = os.path.join(ROOT, ".venv-trl", "bin", "python")
TRL_SIDE = os.path.join(ROOT, "benchmarks", "trl_side.py")

# What both sides run (trl_side.py hard-codes the same numbers).
SHAPE = {
    "flavour": "gpt2", "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "vocab": 8000,
    "dtype": "fp32", "device": "cpu", "prompt_len": 32, "response_len": 64, "temperature": 1.0,
    "ppo": {"prompts": 16, "n_samples": 1, "ppo_epochs": 1, "num_minibatches": 1, "kl_coef": 0.05,
            "kl_estimator": "k1", "kl_placement": "reward", "gamma": 1.0, "lam": 0.95},
    "grpo": {"prompts": 4, "n_samples": 4, "ppo_epochs": 1, "num_minibatches": 1, "kl_coef": 0.05,
             "reward": "trivial python function"},
}  # fmt: skip


class TRLMissing(RuntimeError):
    pass


def trl_side(algo: str, iterations: int, warmup: int, threads: int) -> dict:
    """TRL's numbers from benchmarks/trl_side.py under .venv-trl (one JSON line on its stdout)."""
    if not os.path.exists(TRL_PYTHON):
        raise TRLMissing(
            f"{TRL_PYTHON} not found: TRL runs in its own venv. Create it with\n    bash scripts/setup_trl_bench.sh\n"
            "(idempotent; installs torch 2.13.0 CPU, trl 0.29.1, transformers 5.24.0 into .venv-trl)"
        )
    cmd = [TRL_PYTHON, TRL_SIDE, "--algo", algo, "--iterations", str(iterations), "--warmup", str(warmup),
           "--threads", str(threads)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)  # keep this venv's packages out of TRL's interpreter
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"TRL side failed ({' '.join(cmd)}), exit {proc.returncode}:\n{tail}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"TRL side printed no JSON line; stdout was:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def mrlhf_side(algo: str, iterations: int, warmup: int) -> dict:
    """`mrlhf ppo` on the same shape in this process (benchmarks/mrlhf_ppo_side.py)."""
    from benchmarks.mrlhf_ppo_side import mrlhf_side as run

    return run(algo, iterations, warmup, threads=int(os.environ.get("MRLHF_BENCH_THREADS", "2")))


def iteration_flops(algo: str, part: str = "all") -> float:
    """Matmul FLOPs of one TRL iteration of SHAPE[algo] (trl_side.py's docstring), counted at the minimum any
    implementation needs: forward 2 * params * tokens (backward twice that), the LM head only where a log-prob is used
    (response positions), causal attention scores and values; generation = prefill + one decode step per further
    token. PPO: generation (whose log-probs are the old ones), reference, value and reward forwards, policy and value
    forward+backward. GRPO: generation, reference forward, policy forward+backward (the reward is a Python function
    on both sides)."""
    h, layers, vocab = SHAPE["hidden_size"], SHAPE["num_layers"], SHAPE["vocab"]
    prompt, resp = SHAPE["prompt_len"], SHAPE["response_len"]
    seqs = SHAPE[algo]["prompts"] * SHAPE[algo]["n_samples"]
    seq = prompt + resp
    body = layers * 12 * h * h  # qkv + proj (4h^2) and the 4h MLP (8h^2), per token
    head = vocab * h

    def attn(length: int) -> float:  # causal scores + values of one sequence over all layers
        return layers * 2 * length * length * h

    gen = seqs * (2 * body * (seq - 1) + 2 * head * resp + attn(seq - 1))
    decode = seqs * (2 * body * (resp - 1) + 2 * head * (resp - 1) + attn(seq - 1) - attn(prompt))
    if part == "decode":
        return decode
    lm_forward = seqs * (2 * body * seq + 2 * head * resp + attn(seq))
    scalar_forward = seqs * (2 * body * seq + attn(seq))
    total = gen + lm_forward + 2 * scalar_forward + 3 * lm_forward + 3 * scalar_forward if algo == "ppo" else (
        gen + lm_forward + 3 * lm_forward)  # fmt: skip
    return total - decode if part == "batched" else total


def matmul_rate(threads: int, reps: int = 20, rows: int | None = None) -> float:
    """fp32 matmul FLOP/s of this CPU at the benchmark's shapes (best of ``reps``; torch's own kernels): the layers'
    and the LM head's weight matmuls with ``rows`` rows -- by default every token of the batch (the scoring and
    training passes); one per sequence for a decode step."""
    import time

    import torch

    torch.set_num_threads(threads)
    h, vocab = SHAPE["hidden_size"], SHAPE["vocab"]
    full = rows is None
    rows = rows or SHAPE["ppo"]["prompts"] * (SHAPE["prompt_len"] + SHAPE["response_len"])
    head_rows = rows // 3 * 2 if full else rows
    shapes = [(rows, h, 3 * h), (rows, h, h), (rows, h, 4 * h), (rows, 4 * h, h), (head_rows, h, vocab)]
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a, b in pairs:
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return flops / best


def fmt(x, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'algo':>5} {'mrlhf s/iter':>13} {'TRL s/iter':>11} {'TRL/mrlhf':>10} {'gen share mrlhf':>16} "  # medians
            f"{'gen share TRL':>14} {'floor s/iter':>13} {'TRL/floor':>10}")
    out = [head]
    for r in rows:
        m, t = r.get("mrlhf") or {}, r.get("trl") or {}
        ms, ts = m.get("median"), t.get("median")  # medians: robust to a neighbour's burst on a shared CPU
        ratio = ts / ms if ms and ts else None
        out.append(
            f"{r['algo']:>5} {fmt(ms, '13.3f')} {fmt(ts, '11.3f')} {fmt(ratio, '10.2f')} "
            f"{fmt(m.get('generation_share'), '16.2f')} {fmt(t.get('generation_share'), '14.2f')} "
            f"{fmt(r.get('floor_s'), '13.3f')} {fmt(ts / r['floor_s'] if ts and r.get('floor_s') else None, '10.2f')}"
        )
    return "\n".join(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default="ppo,grpo", help="comma-separated: ppo, grpo")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    algos = [x.strip() for x in a.algos.split(",") if x.strip()]
    bad = [x for x in algos if x not in ("ppo", "grpo")]
    if bad or not algos:
        ap.error(f"--algos takes ppo and/or grpo, got {a.algos!r}")

    import torch

    torch.set_num_threads(a.threads)
    rows, notes = [], []
    for algo in algos:
        row = {"algo": algo}
        try:
            row["trl"] = trl_side(algo, a.iterations, a.warmup, a.threads)
        except TRLMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            row["mrlhf"] = mrlhf_side(algo, a.iterations, a.warmup)
        except NotImplementedError as e:
            row["mrlhf"] = None
            notes.append(f"{algo}: mrlhf side not available ({e})")
        rows.append(row)

    rate = matmul_rate(a.threads)
    decode_rate = matmul_rate(a.threads, reps=200, rows=SHAPE["ppo"]["prompts"] * SHAPE["ppo"]["n_samples"])
    for row in rows:
        row["gflop"] = iteration_flops(row["algo"]) / 1e9
        row["decode_gflop"] = iteration_flops(row["algo"], "decode") / 1e9
        # each part of the work at torch's own matmul speed for its shape: decode steps multiply one row per sequence
        row["floor_s"] = (row["gflop"] - row["decode_gflop"]) * 1e9 / rate + row["decode_gflop"] * 1e9 / decode_rate
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if a.json:
        print(json.dumps({"rows": rows, "shape": SHAPE, "threads": a.threads, "iterations": a.iterations,
                          "warmup": a.warmup, "cpu": cpu_model(), "torch": torch.__version__,
                          "matmul_gflops": rate / 1e9, "decode_matmul_gflops": decode_rate / 1e9,
                          "loadavg": load, "notes": notes}))  # fmt: skip
    else:
        print(f"# {cpu_model()}, {a.threads} threads, {a.iterations} iterations after {a.warmup} warm-up, "
              f"mrlhf torch {torch.__version__}, TRL {next((r['trl']['trl_version'] for r in rows), '?')}")  # fmt: skip
        print(table(rows))
        for n in notes:
            print(f"# {n}")
        work = ", ".join(f"{r['algo']} {r['gflop']:.0f} GFLOP, {r['decode_gflop']:.0f} of them in decode steps"
                         for r in rows)  # fmt: skip
        print(f"# floor: the iteration's matmul FLOPs ({work}) at this CPU's measured fp32 matmul rate for their "
              f"shapes ({rate / 1e9:.0f} GFLOP/s over whole sequences, {decode_rate / 1e9:.0f} GFLOP/s for a decode "
              f"step's {SHAPE['ppo']['prompts'] * SHAPE['ppo']['n_samples']} rows; {a.threads} threads); TRL/floor is "
              "the largest speed-up over TRL that any implementation doing this work could reach")
        if load:
            print(f"# load average after the run: {load[0]:.2f} (the numbers are noisy if other jobs shared the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
