"""Direct preference optimisation: the policy learns from pairs against a frozen reference (the SFT model).

Reference log-probs are either computed once for the whole dataset before training (``dpo.precompute_reference``,
one forward-only pass; the reference then stays in host memory) or per step, with the reference brought back to
the device only for that pass.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mrlhf.config import RunConfig
from mrlhf.errors import ConfigError
from mrlhf.models import residency
from mrlhf.models.roles import build_role
from mrlhf.parallel import comm
from mrlhf.parallel.schedule import forward_only
from mrlhf.parallel.state import ParallelContext
from mrlhf.rl.losses import dpo_loss, implicit_rewards, sequence_logprob
from mrlhf.trainers.common import (
    SupervisedStage,
    check_tokenizer,
    dp_slice,
    init_path,
    log_main,
    prepare,
    reduce_last_stage_scalars,
    run_supervised,
)
from mrlhf.trainers.rm import preference_microbatches

STATS = ("loss_sum", "pairs", "correct", "margin_sum", "chosen_lp_sum", "rejected_lp_sum")


def sequence_logprobs(model, mbs: list[dict], cfg: RunConfig, device) -> list[torch.Tensor]:
    """Forward-only: per microbatch, the response log-prob of each row [2b] (on the last stage; [] elsewhere)."""
    dtype = next(model.parameters()).dtype
    return forward_only(
        model, mbs, lambda lp, mb: sequence_logprob(lp.float(), mb["loss_mask"]), cfg.model.hidden_size, dtype, device
    )


def reference_table(reference, dataset, cfg: RunConfig, ctx: ParallelContext, pad_id: int) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every pair, identical on every rank."""
    n = len(dataset)
    table = torch.zeros(n, 2, dtype=torch.float64, device=ctx.device)  # collectives take device tensors
    dp, rank = ctx.layout.dp, ctx.dp_rank
    mine = list(range(rank, n, dp))
    mbs = preference_microbatches(dataset, mine, cfg.training.micro_batch_size, pad_id, ctx.device)
    for mb, lp in zip(mbs, sequence_logprobs(reference, mbs, cfg, ctx.device)):
        b = mb["index"].numel()
        table[mb["index"].to(ctx.device)] = torch.stack([lp[:b], lp[b:]], dim=-1).double()
    comm.all_reduce_dp(table)
    comm.broadcast_from_last_stage(table)
    return table.cpu()


def pair_stats(pi_c, pi_r, ref_c, ref_r, loss: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Summable statistics of a microbatch of pairs (train and eval)."""
    r_c, r_r = implicit_rewards(pi_c, pi_r, ref_c, ref_r, beta)
    return {
        "loss_sum": loss.sum(),
        "pairs": torch.tensor(float(pi_c.shape[0])),
        "correct": (r_c > r_r).float().sum(),
        "margin_sum": (r_c - r_r).sum(),
        "chosen_lp_sum": pi_c.sum(),
        "rejected_lp_sum": pi_r.sum(),
    }


def dpo_loss_fn(cfg: RunConfig):
    d = cfg.dpo

    def make(total: float):
        def loss_fn(lp: torch.Tensor, mb: dict[str, torch.Tensor]):
            b = lp.shape[0] // 2
            seq = sequence_logprob(lp.float(), mb["loss_mask"])
            pi_c, pi_r = seq[:b], seq[b:]
            ref = mb["ref_logps"].to(seq.dtype)
            ref_c, ref_r = ref[:b], ref[b:]
            loss = dpo_loss(d.loss, pi_c, pi_r, ref_c, ref_r, d.beta, d.label_smoothing)
            if d.sft_coef:
                tokens = mb["loss_mask"][:b].sum(-1).clamp(min=1)
                loss = loss + d.sft_coef * (-pi_c / tokens)
            return loss.sum() / total, pair_stats(pi_c.detach(), pi_r.detach(), ref_c, ref_r, loss.detach(), d.beta)

        return loss_fn

    return make


def summarize(sums: dict[str, float], total: float, prefix: str = "") -> dict[str, float]:
    n = max(sums["pairs"], 1.0)
    return {
        f"{prefix}loss": sums["loss_sum"] / n,
        f"{prefix}reward_accuracy": sums["correct"] / n,
        f"{prefix}reward_margin": sums["margin_sum"] / n,
        f"{prefix}chosen_logp": sums["chosen_lp_sum"] / n,
        f"{prefix}rejected_logp": sums["rejected_lp_sum"] / n,
    }


def train_dpo(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    t, d = cfg.training, cfg.dpo
    if not cfg.checkpoint.load_dir:
        raise ConfigError("dpo needs checkpoint.load_dir: the SFT checkpoint that is both the start and the reference")
    run = prepare(cfg, ctx, "preference", "dpo", "actor")
    policy, data, tokenizer = run.model, run.data, run.tokenizer
    from mrlhf import checkpoint as ckpt

    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    reference = build_role(cfg, "reference", vocab, device=ctx.device, from_checkpoint=True)
    check_tokenizer(init_path(cfg), tokenizer.hash)
    ckpt.load_model(init_path(cfg), "reference", reference)
    reference.eval().requires_grad_(False)
    pad = tokenizer.pad_id

    table = None
    if d.precompute_reference:
        table = reference_table(reference, data.train, cfg, ctx, pad)
        log_main(f"reference log-probs precomputed for {len(data.train)} pairs")
    if d.offload_reference:
        residency.offload(reference)

    def attach_reference(mbs: list[dict]) -> None:
        if table is not None:
            for mb in mbs:
                idx = mb["index"].cpu()
                mb["ref_logps"] = torch.cat([table[idx, 0], table[idx, 1]]).to(ctx.device)
            return
        residency.reload(reference, ctx.device)
        lps = sequence_logprobs(reference, mbs, cfg, ctx.device)
        for mb, lp in zip(mbs, lps or [None] * len(mbs)):
            mb["ref_logps"] = lp if lp is not None else torch.zeros(2 * mb["index"].numel(), device=ctx.device)
        if d.offload_reference:
            residency.offload(reference)

    def evaluate() -> dict[str, float]:
        if data.eval is None:
            return {}
        unit = ctx.layout.dp * t.micro_batch_size
        n = max(unit, len(data.eval) // unit * unit)
        idx = dp_slice([i % len(data.eval) for i in range(n)])
        mbs = preference_microbatches(data.eval, idx, t.micro_batch_size, pad, ctx.device)
        residency.reload(reference, ctx.device)
        ref = sequence_logprobs(reference, mbs, cfg, ctx.device)
        if d.offload_reference:
            residency.offload(reference)
        policy.eval()
        pol = sequence_logprobs(policy, mbs, cfg, ctx.device)
        policy.train()
        sums = dict.fromkeys(STATS, 0.0)
        for mb, p, r in zip(mbs, pol, ref):
            b = mb["index"].numel()
            loss = dpo_loss(d.loss, p[:b], p[b:], r[:b], r[b:], d.beta, d.label_smoothing)
            for k, v in pair_stats(p[:b], p[b:], r[:b], r[b:], loss, d.beta).items():
                sums[k] += float(v)
        sums = dict(zip(STATS, reduce_last_stage_scalars([sums[k] for k in STATS])))
        return summarize(sums, 0.0, "eval_")

    stage = SupervisedStage(
        name="DPO",
        model=policy,
        optimizer=run.optimizer,
        train_size=len(data.train),
        stat_keys=STATS,
        microbatches=lambda idx: preference_microbatches(data.train, idx, t.micro_batch_size, pad, ctx.device),
        count=lambda mbs: sum(mb["index"].numel() for mb in mbs),
        loss_fn=dpo_loss_fn(cfg),
        summarize=summarize,
        evaluate=evaluate,
        before_step=attach_reference,
    )
    result = run_supervised(cfg, ctx, stage, run.models, run.optimizers, run.state, tokenizer.hash)
    return {**result, "model": policy, "output_dir": os.path.abspath(t.output_dir)}
