"""`mrlhf plot RUN_DIR`: PNG curves of a run's metrics.jsonl (one figure per metric group), with matplotlib."""

from __future__ import annotations

import json
import os

from mrlhf.errors import DataError

# Figures of a PPO run (metrics that a run does not have are left out; other stages get one figure per metric).
GROUPS = {
    "reward": ("reward_raw_mean", "reward_raw_std", "reward_mean", "reward_std"),
    "kl": ("kl_per_sequence", "kl_per_token", "kl_coef"),
    "policy": ("pg_loss", "clip_fraction", "approx_kl", "entropy"),
    "critic": ("value_loss", "value_clip_fraction", "explained_variance"),
    "responses": ("response_length", "truncation_rate", "flat_group_fraction"),
    "logprob_mismatch": ("logprob_mismatch_mean", "logprob_mismatch_max"),
    "skipped": ("skipped_steps", "skipped_steps_total"),
    "time": ("time_generate_s", "time_experience_s", "time_reward_function_s", "time_train_s", "time_eval_s"),
    "eval": ("eval_reward_mean", "eval_reward_std", "eval_response_length", "eval_truncation_rate"),
}


def read_metrics(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, n, None, f"invalid JSON at column {e.colno}: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(path, n, None, "a metrics record must be a JSON object")
            records.append(rec)
    if not records:
        raise DataError(path, None, None, "no metrics records")
    return records


def figure_groups(records: list[dict]) -> tuple[str, dict[str, list[str]]]:
    """The x axis and the curves of each figure: ``(x_key, {figure name: [metric, ...]})``.

    A PPO run (records keyed by ``iteration``) gets the ``GROUPS`` figures, each with the metrics the run has; other
    stages (keyed by ``step``) one figure per numeric metric. Keyed by the x axis, not by which metrics appear:
    SFT/RM/DPO records also carry ``skipped_steps_total``."""
    x_key = "iteration" if "iteration" in records[0] else "step"
    numeric = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != x_key}
    groups = {}
    if x_key == "iteration":
        groups = {name: [k for k in keys if k in numeric] for name, keys in GROUPS.items()}
        groups = {name: keys for name, keys in groups.items() if keys}
    if not groups:  # not a PPO run (or one with none of the PPO metrics): one figure per metric
        groups = {k: [k] for k in sorted(numeric) if not k.startswith(("mem_", "consumed"))}
    return x_key, groups


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write PNGs under ``out_dir`` (default RUN_DIR/plots); returns their paths."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(path, None, None, "not found (is this a run's output_dir?)")
    records = read_metrics(path)
    try:
        import matplotlib
    except ImportError:
        from mrlhf.errors import MrlhfError

        raise MrlhfError("mrlhf plot needs matplotlib: run scripts/setup.sh (or pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, groups = figure_groups(records)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in groups.items():
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            pts = [(r[x_key], r[key]) for r in records if isinstance(r.get(key), (int, float)) and x_key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, marker="o" if len(pts) < 30 else None, ms=3)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel(x_key)
        fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: {name}")
        fig.tight_layout()
        target = os.path.join(out_dir, f"{name}.png")
        fig.savefig(target, dpi=90)
        plt.close(fig)
        written.append(target)
    return written
