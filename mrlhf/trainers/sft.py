"""Supervised fine-tuning: next-token loss on response tokens, through the shared 1F1B schedule."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf.config import RunConfig
from mrlhf.data.collate import collate_packed_sft, collate_sft, pack_sft
from mrlhf.parallel.schedule import forward_only
from mrlhf.parallel.state import ParallelContext
from mrlhf.trainers.common import (
    SupervisedStage,
    dp_slice,
    prepare,
    reduce_last_stage_scalars,
    run_supervised,
)


def make_microbatches(
    dataset, indices: list[int], cfg: RunConfig, pad_id: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's samples -> padded (or packed) microbatches of ``micro_batch_size`` rows on ``device``."""
    mbs = cfg.training.micro_batch_size
    samples = [dataset[j] for j in indices]
    if cfg.data.pack_sft:
        rows = pack_sft(samples, cfg.data.max_seq_len - 1)
        batches = [collate_packed_sft(rows[i : i + mbs], pad_id) for i in range(0, len(rows), mbs)]
    else:
        batches = [collate_sft(samples[i : i + mbs], pad_id) for i in range(0, len(samples), mbs)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def real_tokens(mb: dict[str, torch.Tensor]) -> int:
    mask = mb.get("real_tokens", mb["attention_mask"])
    return int(mask.sum())


def sft_loss_fn(global_tokens: float):
    """Sum of response-token NLL over the microbatch / response tokens in the whole global batch."""

    def loss_fn(logprobs: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = -(logprobs * mb["loss_mask"]).sum()
        return nll / global_tokens, {"nll_sum": nll.detach(), "tokens": mb["loss_mask"].sum()}

    return loss_fn


def evaluate(model, dataset, cfg: RunConfig, ctx: ParallelContext, pad_id: int) -> float:
    """Mean response-token NLL on the first ``eval_samples`` held-out samples (split over DP)."""
    t = cfg.training
    unit = ps.get_data_parallel_world_size() * t.micro_batch_size
    n = max(unit, min(t.eval_samples, len(dataset)) // unit * unit)
    indices = [i % len(dataset) for i in range(n)]
    mbs = make_microbatches(dataset, dp_slice(indices), cfg, pad_id, ctx.device)
    model.eval()
    dtype = next(model.parameters()).dtype
    stats = forward_only(
        model,
        mbs,
        lambda lp, mb: (float(-(lp * mb["loss_mask"]).sum()), float(mb["loss_mask"].sum())),
        cfg.model.hidden_size,
        dtype,
        ctx.device,
    )
    model.train()
    nll, tokens = reduce_last_stage_scalars([sum(s[0] for s in stats), sum(s[1] for s in stats)])
    return nll / max(tokens, 1.0)


def train_sft(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    """Run SFT to ``training.train_steps``; returns per-step losses and the final metrics (same on every rank)."""
    t = cfg.training
    run = prepare(cfg, ctx, "sft", "sft", "actor")
    model, data, tokenizer = run.model, run.data, run.tokenizer
    start_time = [0.0]

    def microbatches(indices: list[int]):
        start_time[0] = time.perf_counter()
        return make_microbatches(data.train, indices, cfg, tokenizer.pad_id, ctx.device)

    def count(mbs) -> float:
        count.real = sum(real_tokens(mb) for mb in mbs) * ps.get_data_parallel_world_size()
        return float(sum(mb["loss_mask"].sum() for mb in mbs))

    def summarize(sums: dict[str, float], total: float) -> dict[str, float]:
        return {"loss": sums["nll_sum"] / total, "tokens_per_s": count.real / (time.perf_counter() - start_time[0])}

    stage = SupervisedStage(
        name="SFT",
        model=model,
        optimizer=run.optimizer,
        train_size=len(data.train),
        stat_keys=("nll_sum",),
        microbatches=microbatches,
        count=count,
        loss_fn=sft_loss_fn,
        summarize=summarize,
        evaluate=(lambda: {"eval_loss": evaluate(model, data.eval, cfg, ctx, tokenizer.pad_id)}) if data.eval else None,
    )
    result = run_supervised(cfg, ctx, stage, run.models, run.optimizers, run.state, tokenizer.hash)
    return {**result, "model": model, "output_dir": os.path.abspath(t.output_dir)}
