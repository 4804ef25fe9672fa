"""Reward-model training: Bradley-Terry on preference pairs, chosen and rejected of a pair in one microbatch."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from mrlhf.config import RunConfig
from mrlhf.data.collate import collate_preference
from mrlhf.parallel.schedule import forward_only
from mrlhf.parallel.state import ParallelContext
from mrlhf.rl.losses import pairwise_rm_loss
from mrlhf.trainers.common import (
    SupervisedStage,
    dp_slice,
    prepare,
    reduce_last_stage_scalars,
    run_supervised,
)

STATS = ("loss_sum", "correct", "chosen_sum", "rejected_sum", "pairs")


def preference_microbatches(
    dataset, indices: list[int], mbs: int, pad_id: int, device
) -> list[dict[str, torch.Tensor]]:
    """Pairs -> microbatches of ``mbs`` pairs (2*mbs rows: chosen first, then rejected)."""
    out = []
    for i in range(0, len(indices), mbs):
        part = indices[i : i + mbs]
        batch = collate_preference([dataset[j] for j in part], pad_id)
        batch["index"] = torch.tensor(part, dtype=torch.long)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def pair_stats(scores: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    b = scores.shape[0] // 2
    c, r = scores[:b].detach(), scores[b:].detach()
    return {
        "loss_sum": loss.detach().sum(),
        "correct": (c > r).float().sum(),
        "chosen_sum": c.sum(),
        "rejected_sum": r.sum(),
        "pairs": torch.tensor(float(b)),
    }


def rm_loss_fn(cfg: RunConfig):
    """Loss of one microbatch of pairs, normalised by the pairs of the whole global batch."""

    def make(total: float):
        def loss_fn(scores: torch.Tensor, mb: dict[str, torch.Tensor]):
            b = scores.shape[0] // 2
            margin = None
            if cfg.rm.margin == "data":
                margin = mb["margin"]
            elif cfg.rm.margin == "constant":
                margin = torch.full((b,), cfg.rm.margin_value, device=scores.device)
            loss = pairwise_rm_loss(scores[:b], scores[b:], margin, cfg.rm.center_coef)
            return loss.sum() / total, pair_stats(scores, loss)

        return loss_fn

    return make


def summarize(sums: dict[str, float], total: float, prefix: str = "") -> dict[str, float]:
    n = max(sums["pairs"], 1.0)
    return {
        f"{prefix}loss": sums["loss_sum"] / n,
        f"{prefix}accuracy": sums["correct"] / n,
        f"{prefix}chosen_reward": sums["chosen_sum"] / n,
        f"{prefix}rejected_reward": sums["rejected_sum"] / n,
        f"{prefix}margin": (sums["chosen_sum"] - sums["rejected_sum"]) / n,
    }


def evaluate_rm(model, dataset, cfg: RunConfig, ctx: ParallelContext, pad_id: int) -> tuple[dict[str, float], dict]:
    """Held-out pair metrics, and the mean/std of rewards over every held-out sequence (for PPO's normalisation)."""
    unit = ctx.layout.dp * cfg.training.micro_batch_size
    n = max(unit, len(dataset) // unit * unit)
    indices = [i % len(dataset) for i in range(n)]
    mbs = preference_microbatches(dataset, dp_slice(indices), cfg.training.micro_batch_size, pad_id, ctx.device)
    model.eval()

    def collect(scores, mb):
        loss = pairwise_rm_loss(scores[: scores.shape[0] // 2], scores[scores.shape[0] // 2 :])
        st = pair_stats(scores.float(), loss)
        st["sq_sum"] = (scores.float() ** 2).sum()
        return st

    dtype = next(model.parameters()).dtype
    stats = forward_only(model, mbs, collect, cfg.model.hidden_size, dtype, ctx.device)
    model.train()
    keys = (*STATS, "sq_sum")
    sums = dict(zip(keys, reduce_last_stage_scalars([float(sum(s[k] for s in stats)) for k in keys])))
    count = 2 * sums["pairs"]
    mean = (sums["chosen_sum"] + sums["rejected_sum"]) / count
    std = math.sqrt(max(sums["sq_sum"] / count - mean**2, 0.0))
    return summarize(sums, 0.0, "eval_"), {"mean": mean, "std": std, "count": int(count)}


def train_rm(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    """Train the reward model; the final checkpoint stores reward mean/std over the held-out sequences."""
    t = cfg.training
    run = prepare(cfg, ctx, "preference", "rm", "reward")
    model, data, tokenizer, state = run.model, run.data, run.tokenizer, run.state
    heldout = data.eval if data.eval is not None else data.train

    def evaluate() -> dict[str, float]:
        metrics, reward_stats = evaluate_rm(model, heldout, cfg, ctx, tokenizer.pad_id)
        state.extra["reward_stats"] = reward_stats  # saved with the checkpoint for PPO's reward normalisation
        return metrics

    stage = SupervisedStage(
        name="RM",
        model=model,
        optimizer=run.optimizer,
        train_size=len(data.train),
        stat_keys=STATS,
        microbatches=lambda idx: preference_microbatches(
            data.train, idx, t.micro_batch_size, tokenizer.pad_id, ctx.device
        ),
        count=lambda mbs: sum(mb["index"].numel() for mb in mbs),
        loss_fn=rm_loss_fn(cfg),
        summarize=summarize,
        evaluate=evaluate,
    )
    result = run_supervised(cfg, ctx, stage, run.models, run.optimizers, state, tokenizer.hash)
    return {**result, "model": model, "reward_stats": state.extra.get("reward_stats"),
            "output_dir": os.path.abspath(t.output_dir)}  # fmt: skip
