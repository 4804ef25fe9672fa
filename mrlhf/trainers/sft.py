"""Supervised fine-tuning: next-token loss on response tokens, through the shared 1F1B schedule."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf.config import RunConfig
from mrlhf.data.collate import collate_packed_sft, collate_sft, pack_sft
from mrlhf.data.datasets import build_datasets, global_batch_indices
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.errors import DataError
from mrlhf.models.roles import build_role
from mrlhf.parallel import comm
from mrlhf.parallel.schedule import forward_backward, forward_only
from mrlhf.parallel.state import ParallelContext
from mrlhf.testing_faults import maybe_fault
from mrlhf.trainers.common import (
    MetricsWriter,
    log_main,
    maybe_save,
    optimizer_step,
    reduce_last_stage_scalars,
    restore,
    save_resolved_config,
    seed_everything,
)
from mrlhf.trainers.optim import Optimizer


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


def dp_slice(indices: list[int]) -> list[int]:
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(indices) // dp
    return indices[rank * per : (rank + 1) * per]


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
    seed_everything(t.seed)
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    data = build_datasets(cfg, "sft", "sft", tokenizer)
    train, evalset = data.train, data.eval
    if len(train) < t.global_batch_size:
        raise DataError(
            ",".join(cfg.data.source_specs), None, None,
            f"{len(train)} training samples is fewer than one global batch ({t.global_batch_size})",
        )  # fmt: skip
    if any(data.stats.values()):
        log_main(f"data: {data.stats} (length policy '{cfg.data.length_policy}')")
    save_resolved_config(cfg, ctx)

    model = build_role(cfg, "actor", cfg.model.vocab_size or tokenizer.vocab_size).to(ctx.device)
    opt = Optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.parallel.zero1)
    models, optimizers = {"actor": model}, {"actor": opt}
    state = restore(cfg, models, optimizers, tokenizer.hash)
    dtype = next(model.parameters()).dtype
    metrics = MetricsWriter(cfg, ctx, t.train_steps, state.step)
    log_main(
        f"SFT: {len(train)} samples, layout tp={ctx.layout.tp} pp={ctx.layout.pp} dp={ctx.layout.dp}, "
        f"{sum(p.numel() for p in model.parameters())} params on rank 0, steps {state.step}->{t.train_steps}"
    )
    losses: list[float] = []
    grad_norms: list[float] = []
    record: dict[str, Any] = {}
    model.train()
    while state.step < t.train_steps:
        start = time.perf_counter()
        indices = global_batch_indices(len(train), t.seed, state.consumed_samples, t.global_batch_size)
        mbs = make_microbatches(train, dp_slice(indices), cfg, tokenizer.pad_id, ctx.device)
        tokens = torch.tensor([float(sum(mb["loss_mask"].sum() for mb in mbs))], dtype=torch.float64)
        global_tokens = float(comm.all_reduce_dp(tokens))
        stats = forward_backward(model, mbs, sft_loss_fn(global_tokens), cfg.model.hidden_size, dtype, ctx.device)
        step_metrics = optimizer_step(model, opt, cfg, state.step)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        state.extra["lr_scheduler"] = {"last_step": state.step - 1, "last_lr": step_metrics["lr"]}
        (nll,) = reduce_last_stage_scalars([float(sum(s["nll_sum"] for s in stats))])
        loss = nll / global_tokens
        losses.append(loss)
        grad_norms.append(step_metrics["grad_norm"])
        elapsed = time.perf_counter() - start
        seq_tokens = sum(real_tokens(mb) for mb in mbs) * ps.get_data_parallel_world_size()
        record = {
            "step": state.step,
            "loss": loss,
            **step_metrics,
            "consumed_samples": state.consumed_samples,
            "tokens_per_s": seq_tokens / elapsed,
            "step_time_s": elapsed,
        }
        last = state.step == t.train_steps
        if evalset is not None and t.eval_interval and (state.step % t.eval_interval == 0 or last):
            record["eval_loss"] = evaluate(model, evalset, cfg, ctx, tokenizer.pad_id)
        if state.step % cfg.logging.log_interval == 0 or last:
            metrics.write(record)
        maybe_save(cfg, state, models, optimizers, tokenizer.hash, final=last)
        maybe_fault(f"after_step:{state.step}")
    metrics.close()
    if record:
        log_main(
            f"SFT done: step {state.step} loss {record['loss']:.4f}"
            + (f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else "")
        )
    return {"losses": losses, "grad_norms": grad_norms, "final": record, "model": model, "output_dir": os.path.abspath(t.output_dir)}
