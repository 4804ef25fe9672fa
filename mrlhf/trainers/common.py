"""What every trainer shares: seeding, the optimizer step (grad sync, clipping, NaN policy), metrics, progress,
checkpoint cadence and resume."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps

from mrlhf import checkpoint as ckpt
from mrlhf.config import OptimizerConfig, RunConfig, SchedulerConfig
from mrlhf.parallel import comm
from mrlhf.parallel.grads import (
    all_reduce_dp_grads,
    clip_grads,
    global_grad_norm,
    params_with_grad,
    sync_tied_embedding_grads,
)
from mrlhf.parallel.state import ParallelContext
from mrlhf.trainers.optim import Optimizer, lr_at


@dataclass
class TrainState:
    """Where a run is: the next optimizer step and how many samples it has consumed."""

    step: int = 0
    consumed_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "extra": self.extra}


def seed_everything(seed: int) -> None:
    """The default streams (alike on every rank) and this rank's TP-region stream (``parallel.random``)."""
    from mrlhf.parallel.random import seed_model_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    seed_model_parallel(seed, tp_rank)


def optimizer_step(
    model: torch.nn.Module,
    opt: Optimizer,
    cfg: RunConfig,
    step: int,
    opt_cfg: OptimizerConfig | None = None,
    sched_cfg: SchedulerConfig | None = None,
    total_steps: int | None = None,
    on_stepped: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Finish the gradients of one global batch and step: tied sync, DP all-reduce, norm, clip, AdamW.

    ``opt_cfg``/``sched_cfg``/``total_steps`` default to the run's ``optimizer``, ``scheduler`` and
    ``training.train_steps`` (PPO's critic passes its own). ``on_stepped`` runs after the step, before the gradients
    are freed: the moment a training phase holds the most (parameters, gradients and optimizer state). A non-finite gradient norm -- seen alike by every rank,
    since the DP all-reduce spreads it and the norm is reduced over TP and PP -- skips the update (parameters and
    optimizer state untouched; counted in the returned metrics) instead of corrupting weights.
    """
    opt_cfg = opt_cfg or cfg.optimizer
    params = params_with_grad(model)
    sync_tied_embedding_grads(model)
    all_reduce_dp_grads(params, cfg.parallel.grad_bucket_mb)
    norm = global_grad_norm(params)
    lr = lr_at(step, total_steps or cfg.training.train_steps, opt_cfg, sched_cfg or cfg.scheduler)
    skipped = not np.isfinite(norm)
    if not skipped:
        clip_grads(params, opt_cfg.clip_grad, norm)
        opt.step(lr)
    if on_stepped is not None:
        on_stepped()
    opt.zero_grad()
    return {"lr": lr, "grad_norm": norm, "skipped_step": float(skipped)}


def check_skip(state: TrainState, skipped: float, cfg: RunConfig, what: str, step: int, model: str = "") -> None:
    """Count skipped (non-finite) steps: warn at each, stop after training.max_consecutive_skips in a row. ``model``
    names whose steps these are where several models step in turn (PPO's actor and critic): each has its own run of
    skips, so the critic's good steps do not hide an actor that never steps."""
    extra = state.extra
    key = f"consecutive_skips_{model}" if model else "consecutive_skips"
    if not skipped:
        extra[key] = 0
        return
    extra["skipped_steps"] = extra.get("skipped_steps", 0) + 1
    extra[key] = extra.get(key, 0) + 1
    log_main(f"warning: {what} step {step} skipped (non-finite loss or gradient); {extra[key]} in a row")
    limit = cfg.training.max_consecutive_skips
    if extra[key] >= limit:
        from mrlhf.errors import TrainingError

        raise TrainingError(
            f"{what}: {extra[key]} optimizer steps in a row had a non-finite loss or gradient (step "
            f"{step}); stopping (training.max_consecutive_skips={limit}). Lower the learning rate or check the data."
        )


def reduce_last_stage_scalars(values: list[float], op: torch.distributed.ReduceOp = torch.distributed.ReduceOp.SUM
                              ) -> list[float]:  # fmt: skip
    """Sum (or ``op``) per-DP-rank scalars of the last stage over DP and hand the result to every rank."""
    t = torch.tensor(
        values if ps.is_pipeline_last_stage() else [0.0] * len(values), dtype=torch.float64, device=comm.run_device()
    )
    comm.all_reduce_dp(t, op=op)
    comm.broadcast_from_last_stage(t)
    return t.tolist()


class MetricsWriter:
    """jsonl metrics (rank 0) and a progress bar on rank 0 when stderr is a terminal."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, total: int, initial: int) -> None:
        self.enabled = ctx.is_main
        self.path = cfg.metrics_file
        self.bar = None
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if initial == 0 and os.path.exists(self.path):  # a fresh run starts a fresh file; a resume appends
                os.remove(self.path)
            show = cfg.logging.progress_bar and sys.stderr.isatty() and not os.environ.get("CI")
            if show:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
        self.tb = None
        if self.enabled and cfg.logging.tensorboard:
            try:  # TensorBoard only when installed
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(cfg.training.output_dir, "tensorboard"))
        self.done = initial

    BAR_KEYS = ("loss", "lr", "grad_norm", "reward_raw_mean", "kl_per_sequence", "response_length")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record.get("step", record.get("iteration", 0)))
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not k.startswith(("step", "iteration")):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(max(step - self.done, 0))
            self.done = max(step, self.done)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in self.BAR_KEYS})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def save_resolved_config(cfg: RunConfig, ctx: ParallelContext) -> None:
    if ctx.is_main:
        os.makedirs(cfg.training.output_dir, exist_ok=True)
        with open(os.path.join(cfg.training.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())


def restore(
    cfg: RunConfig, models: dict[str, torch.nn.Module], optimizers: dict[str, Optimizer], tokenizer_hash: str
) -> TrainState:
    """Resume from the newest checkpoint in save_dir, else initialise weights from load_dir, else fresh."""
    state = TrainState()
    path = ckpt.latest_checkpoint(cfg.save_dir) if cfg.checkpoint.resume else None
    if path is not None:
        meta = ckpt.load_checkpoint(
            path, models, optimizers, tokenizer_hash, cfg.to_dict(), cfg.checkpoint.allow_config_change
        )
        ts = meta["train_state"]
        state = TrainState(step=ts["step"], consumed_samples=ts["consumed_samples"], extra=ts.get("extra", {}))
        log_main(f"resumed from {path} at step {state.step}")
    elif cfg.checkpoint.load_dir:
        src = init_path(cfg)
        check_tokenizer(src, tokenizer_hash)
        for role, model in models.items():
            source = ckpt.pick_source_role(src, role)
            new_head = ckpt.load_model(src, role, model, source)
            if new_head:
                model.init_head(cfg.training.seed)
            note = " (backbone only: the head is new)" if new_head else ""
            log_main(f"initialised '{role}' from '{source}' of {src}{note}")
    return state


def check_tokenizer(path: str, tokenizer_hash: str) -> None:
    """Roles that exchange token ids must share the tokenizer: refuse a checkpoint made with another one."""
    saved = ckpt.read_meta(path).get("tokenizer_hash")
    if saved and saved != tokenizer_hash:
        from mrlhf.errors import CheckpointError

        raise CheckpointError(
            f"{path} was trained with tokenizer {saved[:12]}..., this run's data.tokenizer_path has {tokenizer_hash[:12]}...:"
            " token ids would not match"
        )


def init_path(cfg: RunConfig) -> str:
    """The checkpoint directory named by checkpoint.load_dir (a save_dir with a 'latest' tracker, or one step)."""
    return ckpt.latest_checkpoint(cfg.checkpoint.load_dir) or cfg.checkpoint.load_dir


def save_due(cfg: RunConfig, state: TrainState, final: bool) -> bool:
    """A checkpoint is written at this step: the last one, or every checkpoint.save_interval steps."""
    interval = cfg.checkpoint.save_interval
    return bool(cfg.checkpoint.enabled and (final or (interval and state.step % interval == 0)))


def maybe_save(
    cfg: RunConfig,
    state: TrainState,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, Optimizer],
    tokenizer_hash: str,
    final: bool,
) -> None:
    if not save_due(cfg, state, final):
        return
    ckpt.save_checkpoint(
        cfg.save_dir,
        state.step,
        models,
        optimizers if cfg.checkpoint.save_optimizer else {},
        state.to_dict(),
        cfg.to_dict(),
        tokenizer_hash,
        cfg.checkpoint.keep_last,
    )


def log_main(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"[mrlhf {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The loop every supervised stage (SFT, RM, DPO) shares


@dataclass
class SupervisedStage:
    """What differs between SFT, RM and DPO; :func:`run_supervised` does the rest.

    ``microbatches(indices)`` builds this DP rank's microbatches from dataset indices; ``count(mbs)`` is the local
    normaliser (tokens or pairs) that is summed over DP; ``loss_fn(total)`` returns the schedule's loss function,
    whose stats (named by ``stat_keys``) are sums; ``summarize(sums, total)`` turns summed stats into logged metrics; ``evaluate()`` returns
    eval metrics (or {}); ``before_step()`` runs per step before the schedule (e.g. reference log-probs).
    """

    name: str
    model: torch.nn.Module
    optimizer: Optimizer
    train_size: int
    stat_keys: tuple[str, ...]
    microbatches: Any
    count: Any
    loss_fn: Any
    summarize: Any
    evaluate: Any = None
    before_step: Any = None


def dp_slice(indices: list[int]) -> list[int]:
    """This DP rank's contiguous share of a global batch."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(indices) // dp
    return indices[rank * per : (rank + 1) * per]


def run_supervised(
    cfg: RunConfig,
    ctx: ParallelContext,
    stage: SupervisedStage,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, Optimizer],
    state: TrainState,
    tokenizer_hash: str,
) -> dict[str, Any]:
    """Train ``stage.model`` to ``training.train_steps``; returns per-step losses, grad norms and the last record."""
    from mrlhf.data.datasets import global_batch_indices
    from mrlhf.parallel.schedule import forward_backward
    from mrlhf.testing_faults import maybe_fault, poison_gradients

    t = cfg.training
    model, opt = stage.model, stage.optimizer
    dtype = next(model.parameters()).dtype
    metrics = MetricsWriter(cfg, ctx, t.train_steps, state.step)
    log_main(
        f"{stage.name}: {stage.train_size} samples, layout tp={ctx.layout.tp} pp={ctx.layout.pp} dp={ctx.layout.dp}, "
        f"{sum(p.numel() for p in model.parameters())} params on rank 0, steps {state.step}->{t.train_steps}"
    )
    losses: list[float] = []
    grad_norms: list[float] = []
    record: dict[str, Any] = {}
    model.train()
    while state.step < t.train_steps:
        start = time.perf_counter()
        indices = global_batch_indices(stage.train_size, t.seed, state.consumed_samples, t.global_batch_size)
        mbs = stage.microbatches(dp_slice(indices))
        if stage.before_step is not None:
            stage.before_step(mbs)
        count = torch.tensor([float(stage.count(mbs))], dtype=torch.float64, device=ctx.device)
        total = float(comm.all_reduce_dp(count))
        stats = forward_backward(model, mbs, stage.loss_fn(total), cfg.model.hidden_size, dtype, ctx.device)
        poison_gradients(model, ctx.rank, state.step)  # fault tests only (MRLHF_FAULT_NAN_LOSS)
        step_metrics = optimizer_step(model, opt, cfg, state.step)
        check_skip(state, step_metrics["skipped_step"], cfg, stage.name, state.step + 1)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        state.extra["lr_scheduler"] = {"last_step": state.step - 1, "last_lr": step_metrics["lr"]}
        keys = stage.stat_keys  # stats exist on the last stage only; every stage joins the reduction
        sums = dict(zip(keys, reduce_last_stage_scalars([float(sum(st[k] for st in stats)) for k in keys])))
        summary = stage.summarize(sums, total)
        losses.append(summary["loss"])
        grad_norms.append(step_metrics["grad_norm"])
        elapsed = time.perf_counter() - start
        record = {"step": state.step, **summary, **step_metrics, "consumed_samples": state.consumed_samples,
                  "skipped_steps_total": state.extra.get("skipped_steps", 0), "step_time_s": elapsed}  # fmt: skip
        last = state.step == t.train_steps
        if stage.evaluate is not None and ((t.eval_interval and state.step % t.eval_interval == 0) or last):
            record.update(stage.evaluate())
        if state.step % cfg.logging.log_interval == 0 or last:
            metrics.write(record)
        maybe_save(cfg, state, models, optimizers, tokenizer_hash, final=last)
        maybe_fault(f"after_step:{state.step}")
    metrics.close()
    if record:
        shown = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("loss", "eval_", "acc")))
        log_main(f"{stage.name} done: step {state.step} {shown} skipped steps {state.extra.get('skipped_steps', 0)}")
    return {"losses": losses, "grad_norms": grad_norms, "final": record}


@dataclass
class Prepared:
    """Everything a supervised stage starts from: tokenizer, data, its trained role (restored or initialised)."""

    tokenizer: Any
    data: Any
    model: torch.nn.Module
    optimizer: Optimizer
    models: dict[str, torch.nn.Module]
    optimizers: dict[str, Optimizer]
    state: TrainState


STAGE_DATA = {"sft": ("sft", "sft"), "rm": ("preference", "rm"), "dpo": ("preference", "dpo")}


def load_stage_data(cfg: RunConfig, kind: str, stage: str):
    """Tokenizer and validated datasets of a stage; needs no process group (the CLI runs it before any)."""
    from mrlhf.data.datasets import build_datasets
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.errors import DataError

    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    data = build_datasets(cfg, kind, stage, tokenizer)
    if len(data.train) < cfg.training.global_batch_size:
        raise DataError(
            ",".join(cfg.data.source_specs), None, None,
            f"{len(data.train)} training samples is fewer than one global batch ({cfg.training.global_batch_size})",
        )  # fmt: skip
    return tokenizer, data


def prepare(cfg: RunConfig, ctx: ParallelContext, kind: str, stage: str, role: str) -> Prepared:
    """Seed, load and validate the data (before any model exists), build ``role``, resume or initialise it."""
    from mrlhf.models.roles import build_role
    from mrlhf.models.spec import describe_backend

    seed_everything(cfg.training.seed)
    log_main(describe_backend(cfg.model))
    tokenizer, data = load_stage_data(cfg, kind, stage)
    if any(data.stats.values()):
        log_main(f"data: {data.stats} (length policy '{cfg.data.length_policy}')")
    save_resolved_config(cfg, ctx)
    loading = cfg.checkpoint.load_dir or (cfg.checkpoint.resume and ckpt.latest_checkpoint(cfg.save_dir))
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    model = build_role(cfg, role, vocab, device=ctx.device, from_checkpoint=bool(loading))
    opt = Optimizer(
        [p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.parallel.zero1,
        fp32_grads=cfg.training.grad_reduce_in_fp32,
    )  # fmt: skip
    models, optimizers = {role: model}, {role: opt}
    state = restore(cfg, models, optimizers, tokenizer.hash)
    return Prepared(tokenizer, data, model, opt, models, optimizers, state)
