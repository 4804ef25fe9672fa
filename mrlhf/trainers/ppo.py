"""Stage 3: PPO (and GRPO, RLOO, REINFORCE++) with the actor, reference, critic and reward model on one layout.

One iteration, one line per phase (each timed)::

    prompts -> rollout (generate in the training layout) -> score (forward-only passes of the four roles)
            -> shape (rewards, KL, advantages) -> update (ppo_epochs x minibatches, 1F1B, actor and critic) -> save

Roles: actor and reference from ``ppo.actor_load_dir`` (SFT), critic and reward from ``ppo.critic_load_dir`` (RM);
critic-free estimators build no critic. All roles share the run's layout and model shape. Batching: see
:class:`mrlhf.config.PPOSection`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf import checkpoint as ckpt
from mrlhf.config import ModelConfig, RunConfig
from mrlhf.errors import CheckpointError, ConfigError
from mrlhf.models import residency
from mrlhf.models.roles import RoleModel, build_role
from mrlhf.parallel import comm
from mrlhf.parallel.schedule import forward_backward
from mrlhf.parallel.state import ParallelContext
from mrlhf.rl.advantages import RewardNormalizer, flat_groups
from mrlhf.rl.ema import ema_update
from mrlhf.rl.experience import Experience
from mrlhf.rl.kl import build_kl_controller, kl_penalty
from mrlhf.rl.make_experience import forward_rows, rollout, score, shape
from mrlhf.rl.policy_losses import aggregate, policy_loss, value_loss
from mrlhf.rl.reward_fn import RewardFunction
from mrlhf.rl.reward_fn import load as load_reward_function
from mrlhf.testing_faults import maybe_fault, nan_loss_requested
from mrlhf.trainers.common import (
    MetricsWriter,
    TrainState,
    check_skip,
    check_tokenizer,
    dp_slice,
    log_main,
    maybe_save,
    optimizer_step,
    reduce_last_stage_scalars,
    save_due,
    save_resolved_config,
    seed_everything,
)
from mrlhf.trainers.optim import Optimizer

FROZEN = ("reference", "reward")


@dataclass
class PPORun:
    """Everything an iteration needs: data, roles, optimizers, controllers and where the run is."""

    tokenizer: Any
    prompts: Any
    ptx: Any
    roles: dict[str, RoleModel]
    optimizers: dict[str, Optimizer]
    ema: RoleModel | None
    state: TrainState
    kl_ctl: Any
    normalizer: RewardNormalizer
    reward_fn: RewardFunction | None = None
    saved: dict[str, torch.nn.Module] = field(default_factory=dict)
    eval_fn: RewardFunction | None = None  # scores held-out responses when a function does (else the reward model)


# ----------------------------------------------------------------------------------------------------------------------
# Start-up: data, roles from their checkpoints (or a resume), controllers


def load_ppo_data(cfg: RunConfig):
    """Tokenizer, prompt datasets and the optional ptx dataset, after checking that every role's checkpoint exists;
    needs no process group (the CLI runs it first)."""
    from mrlhf.data.datasets import build_datasets
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.errors import DataError

    if not cfg.generation.temperature > 0:
        raise ConfigError("ppo needs generation.temperature > 0 (rollouts are sampled; greedy has no log-probs)")
    for spec in cfg.ppo.reward_functions:  # a typo fails here, before any checkpoint, process group or model
        load_reward_function(spec)
    for spec in cfg.ppo.eval_reward_functions:
        load_reward_function(spec, "ppo.eval_reward_function")
    for name in ("actor_load_dir", "reference_load_dir", "critic_load_dir", "reward_load_dir"):
        src = getattr(cfg.ppo, name)
        if src is not None:
            try:
                ckpt.read_meta(ckpt.latest_checkpoint(src) or src)
            except CheckpointError as e:
                raise CheckpointError(f"ppo.{name}={src}: {e}") from None
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    prompts = build_datasets(cfg, "prompt", "ppo", tokenizer)
    if len(prompts.train) < cfg.training.global_batch_size:
        raise DataError(
            ",".join(cfg.data.source_specs), None, None,
            f"{len(prompts.train)} prompts is fewer than one rollout batch (training.global_batch_size "
            f"{cfg.training.global_batch_size})",
        )  # fmt: skip
    if cfg.training.eval_interval > 0 and (prompts.eval is None or len(prompts.eval) == 0):
        raise ConfigError("ppo: training.eval_interval > 0 evaluates on held-out prompts, but there are none: set "
                          "data.eval_path (or data.eval_fraction), or training.eval_interval=0")  # fmt: skip
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        ptx_cfg = copy.deepcopy(cfg)
        ptx_cfg.data.train_path, ptx_cfg.data.sources, ptx_cfg.data.eval_path = cfg.ppo.ptx_path, [], None
        ptx_cfg.data.data_split, ptx_cfg.data.eval_fraction = None, 0.0
        ptx = build_datasets(ptx_cfg, "sft", "sft", tokenizer).train
    return tokenizer, prompts, ptx


SHAPE_FIELDS = ("flavour", "num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_size", "tied",
                "has_qkv_bias", "rotary_base")  # fmt: skip


def check_model_shape(cfg: RunConfig, path: str, role: str) -> None:
    """Every role shares the run's model shape: refuse a checkpoint of another shape, naming both."""
    saved = ckpt.read_meta(path).get("config", {}).get("model")
    if not saved:
        return
    try:
        theirs = ModelConfig(**saved)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"ppo: the {role} checkpoint {path} has an unreadable model section: {e}") from None
    diff = [f"{k} {getattr(theirs, k)} (checkpoint) vs {getattr(cfg.model, k)} (run)" for k in SHAPE_FIELDS
            if getattr(theirs, k) != getattr(cfg.model, k)]  # fmt: skip
    if diff:
        raise CheckpointError(
            f"ppo: the {role} checkpoint {path} has another model shape than this run's model section: "
            + "; ".join(diff) + " (all PPO roles share one shape)"
        )


def role_sources(cfg: RunConfig) -> dict[str, str | None]:
    p = cfg.ppo
    return {
        "actor": p.actor_load_dir,
        "reference": p.reference_load_dir or p.actor_load_dir,
        "critic": p.critic_load_dir,
        "reward": None if p.reward_function else p.reward_load_dir or p.critic_load_dir,
    }


def initialise_role(cfg: RunConfig, role: str, model: RoleModel, src_dir: str | None, tokenizer_hash: str) -> None:
    if src_dir is None:
        log_main(f"ppo: '{role}' has no checkpoint (ppo.*_load_dir unset): random initialisation, for benchmarks only")
        return
    path = ckpt.latest_checkpoint(src_dir) or src_dir
    check_tokenizer(path, tokenizer_hash)
    check_model_shape(cfg, path, role)
    source = ckpt.pick_source_role(path, role)
    new_head = ckpt.load_model(path, role, model, source)
    if new_head:
        model.init_head(cfg.training.seed)
    log_main(f"ppo: '{role}' from '{source}' of {path}" + (" (backbone only: the head is new)" if new_head else ""))


def reward_statistics(cfg: RunConfig) -> dict[str, float] | None:
    src = role_sources(cfg)["reward"]
    if src is None:
        return None
    meta = ckpt.read_meta(ckpt.latest_checkpoint(src) or src)
    return meta.get("train_state", {}).get("extra", {}).get("reward_stats")


def prepare_ppo(cfg: RunConfig, ctx: ParallelContext) -> PPORun:
    from mrlhf.models.spec import describe_backend

    p = cfg.ppo
    seed_everything(cfg.training.seed)
    log_main(describe_backend(cfg.model))
    tokenizer, prompts, ptx = load_ppo_data(cfg)
    save_resolved_config(cfg, ctx)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    names = ["actor", "reference"] + ([] if p.reward_function else ["reward"]) + (["critic"] if p.needs_critic else [])
    frozen = [r for r in FROZEN if r in names]
    path = ckpt.latest_checkpoint(cfg.save_dir) if cfg.checkpoint.resume else None
    sources = role_sources(cfg)
    kept = {"actor", "critic"} | (set(frozen) if p.save_frozen_roles else set())  # what a checkpoint holds
    # a role whose weights come from a checkpoint is built on the meta device, not drawn and then overwritten
    roles = {r: build_role(cfg, r, vocab, device=ctx.device,
                           from_checkpoint=(path is not None and r in kept) or sources[r] is not None)
             for r in names}  # fmt: skip
    for r in frozen:
        roles[r].eval().requires_grad_(False)
    optimizers = {r: Optimizer([q for q in roles[r].parameters() if q.requires_grad], o, cfg.parallel.zero1,
                               fp32_grads=cfg.training.grad_reduce_in_fp32)
                  for r, o in (("actor", cfg.optimizer), ("critic", cfg.critic_optimizer)) if r in roles}  # fmt: skip
    ema = None
    if p.ema_decay > 0:
        ema = build_role(cfg, "actor", vocab, device=ctx.device, from_checkpoint=True).requires_grad_(False)
    stats = reward_statistics(cfg)
    if p.reward_normalize and stats is None and not p.reward_function:
        log_main("ppo: the reward checkpoint stores no reward statistics: normalisation starts from the first batch")
    normalizer = RewardNormalizer(
        mean=stats["mean"] if stats else 0.0, std=stats["std"] if stats else 1.0,
        count=float(stats["count"]) if stats else 0.0, clip=p.reward_clip if p.reward_normalize else None,
        update=p.reward_norm_update,
    )  # fmt: skip
    kl_ctl = build_kl_controller(p.kl_controller, p.kl_coef, p.kl_target, p.kl_horizon)
    saved = {r: roles[r] for r in ("actor", "critic") if r in roles}
    if ema is not None:
        saved["ema_actor"] = ema
    if p.save_frozen_roles:
        saved.update({r: roles[r] for r in frozen})
    state = TrainState(extra={"actor_updates": 0, "critic_updates": 0, "skipped_steps": 0})
    if path is not None:
        meta = ckpt.load_checkpoint(path, saved, optimizers, tokenizer.hash, cfg.to_dict(),
                                    cfg.checkpoint.allow_config_change)  # fmt: skip
        ts = meta["train_state"]
        state = TrainState(step=ts["step"], consumed_samples=ts["consumed_samples"], extra=ts.get("extra", {}))
        kl_ctl.load_state_dict(state.extra["kl_controller"])
        normalizer.load_state_dict(state.extra["reward_normalizer"])
        log_main(f"ppo: resumed from {path} at iteration {state.step}")
    for r, model in roles.items():
        if path is None or r not in saved:
            initialise_role(cfg, r, model, sources[r], tokenizer.hash)
    if ema is not None and path is None:
        with torch.no_grad():
            for e, a in zip(ema.parameters(), roles["actor"].parameters()):
                e.copy_(a)
    if p.offload_frozen:
        for r in frozen:
            residency.offload(roles[r])
    if p.offload_optimizer:  # on the device only while training (train_ppo brings it back for the updates)
        for opt in optimizers.values():
            residency.offload_optimizer(opt)
    reward_fn = None
    if p.reward_function:
        reward_fn = RewardFunction(p.reward_functions, tokenizer, prompts.train, tokenizer.eos_id, p.reward_weights)
        log_main(f"ppo: rewards from the function {p.reward_function} (no reward model)")
    eval_fn = None
    if cfg.training.eval_interval > 0 and (p.eval_reward_function or p.reward_function):
        specs, weights, name = ((p.eval_reward_functions, None, "ppo.eval_reward_function") if p.eval_reward_function
                                else (p.reward_functions, p.reward_weights, "ppo.reward_function"))  # fmt: skip
        eval_fn = RewardFunction(specs, tokenizer, prompts.eval, tokenizer.eos_id, weights, name)
    return PPORun(tokenizer, prompts, ptx, roles, optimizers, ema, state, kl_ctl, normalizer, reward_fn, saved,
                  eval_fn)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The update: ppo_epochs x minibatches through the 1F1B schedule


def minibatch_rows(exp: Experience, k: int, num_minibatches: int) -> torch.Tensor:
    """Local rows of minibatch ``k``: global sequence ids congruent to k modulo the minibatch count. The same global
    set under every DP layout, and an equal share on every DP rank."""
    return (exp.seq_ids.cpu() % num_minibatches == k).nonzero().flatten()


def _global_counts(mask: torch.Tensor, device) -> tuple[float, float]:
    """Tokens and sequences (rows with a token) of ``mask`` [b, W] summed over DP: the loss normalisers."""
    t = torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]).double().to(device)
    comm.all_reduce_dp(t)
    tokens, seqs = t.tolist()
    return tokens, seqs


def actor_loss_fn(cfg: RunConfig, kl_coef: float, tokens: float, seqs: float, ptx_tokens: float, poison: bool,
                  measure: int = 0, mismatch_max: list[torch.Tensor] | None = None):  # fmt: skip
    """``measure`` (``ppo.old_logprobs=rollout``, where experience making ran no actor pass): 1 sums the entropy of
    the first epoch's forwards, 2 (the first minibatch, still at the rollout's weights) also the |training - rollout|
    log-prob mismatch, whose per-microbatch maxima go to ``mismatch_max``."""
    p = cfg.ppo
    const = p.loss_agg_constant or float(cfg.generation.max_new_tokens)

    def agg(x, mask):
        return aggregate(x, mask, p.loss_agg, tokens, seqs, const)

    def loss_fn(out, mb):
        logprobs, entropy = out if isinstance(out, tuple) else (out, None)  # entropy only with an entropy bonus
        if "ptx" in mb:
            m = mb["loss_mask"]
            nll = -(logprobs * m).sum()
            return p.ptx_coef * nll / max(ptx_tokens, 1.0), {"ptx_nll_sum": nll.detach()}
        m = mb["loss_mask"]
        measured: dict[str, torch.Tensor] = {}
        if measure:
            seen = mb["critic_mask"]  # response tokens of the rows with a finite reward, as experience_stats counts
            measured = {"m_entropy_sum": (entropy.detach() * seen).sum(), "m_tokens": seen.sum()}
            if measure == 2:
                gap = (logprobs.detach() - mb["rollout_logprobs"]).abs() * seen
                measured.update(m_mismatch_sum=gap.sum(), m_mismatch_tokens=seen.sum())
                mismatch_max.append(gap.max() if gap.numel() else gap.new_zeros(()))
        pg, clipped, approx_kl = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], p.clip_low, p.clip_high,
                                             p.dual_clip, p.importance_sampling_level, m)  # fmt: skip
        loss = agg(pg, m)
        if p.entropy_coef:
            loss = loss - p.entropy_coef * agg(entropy, m)
        if p.kl_placement == "loss":
            loss = loss + kl_coef * agg(kl_penalty(p.kl_estimator, logprobs, mb["ref_logprobs"]), m)
        if poison:  # fault tests: this rank's loss is NaN
            loss = loss * float("nan")
        stats = {"pg_loss_sum": (pg.detach() * m).sum(), "clipped_sum": (clipped * m).sum(),
                 "approx_kl_sum": (approx_kl * m).sum(), "actor_tokens": m.sum(), **measured}  # fmt: skip
        return loss, stats

    return loss_fn


def critic_loss_fn(cfg: RunConfig, tokens: float):
    def loss_fn(values, mb):
        m = mb["critic_mask"]
        vl, clipped = value_loss(values, mb["values"], mb["returns"], cfg.ppo.value_clip)
        loss = (vl * m).sum() / max(tokens, 1.0)
        return loss, {"value_loss_sum": (vl.detach() * m).sum(), "value_clipped_sum": (clipped * m).sum(),
                      "critic_tokens": m.sum()}  # fmt: skip

    return loss_fn


def ptx_microbatches(run: PPORun, cfg: RunConfig, device) -> list[dict[str, torch.Tensor]]:
    """This DP rank's share of the next ptx batch (SFT format), cursor in state.extra['ptx_consumed']."""
    from mrlhf.data.collate import collate_sft
    from mrlhf.data.datasets import global_batch_indices

    p, extra = cfg.ppo, run.state.extra
    indices = global_batch_indices(len(run.ptx), cfg.training.seed, extra.get("ptx_consumed", 0), p.ptx_batch_size)
    extra["ptx_consumed"] = extra.get("ptx_consumed", 0) + p.ptx_batch_size
    mine = dp_slice(indices)
    size = cfg.training.micro_batch_size
    out = []
    for s in range(0, len(mine), size):
        batch = collate_sft([run.ptx[i] for i in mine[s : s + size]], run.tokenizer.pad_id)
        batch["ptx"] = torch.ones(1)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def _sum_stats(stats: list[dict[str, torch.Tensor]], into: dict[str, torch.Tensor]) -> None:
    for st in stats:
        for k, v in st.items():
            into[k] = into.get(k, 0.0) + v.detach().double()


def update(
    run: PPORun, exp: Experience, cfg: RunConfig, ctx: ParallelContext, last: bool,
    mem: dict[str, float] | None = None,
) -> dict[str, float]:  # fmt: skip
    """ppo_epochs x num_minibatches optimizer steps of the actor (after the critic warm-up) and the critic.
    ``mem``: filled with the memory report taken at the first step of each model, while its gradients exist (each
    model's own keys from its own step; the rest from the first)."""
    p, t = cfg.ppo, cfg.training
    extra = run.state.extra
    train_actor = run.state.step >= p.critic_warmup_iterations
    steps_per_iter = p.ppo_epochs * p.num_minibatches
    actor_total = max(1, (t.train_steps - p.critic_warmup_iterations) * steps_per_iter)
    critic_total = t.train_steps * steps_per_iter
    keys = ("old_logprobs", "advantages", "loss_mask") + (("ref_logprobs",) if p.kl_placement == "loss" else ())
    from_rollout = p.old_logprobs == "rollout"
    mismatch_max: list[torch.Tensor] = []
    sums: dict[str, torch.Tensor] = {}
    steps: dict[str, list[dict[str, float]]] = {"actor": [], "critic": []}
    actor, critic = run.roles["actor"], run.roles.get("critic")
    poison = nan_loss_requested(torch.distributed.get_rank(), run.state.step)
    iteration = run.state.step + 1

    def report_at_step(role: str):
        if mem is None or (epoch, k) != (0, 0):
            return None

        def report() -> None:
            now = memory_report(run, ctx.device, peak=False)
            mem.update(now if not mem else {key: v for key, v in now.items() if key.startswith(f"mem_{role}_")})

        return report

    for epoch in range(p.ppo_epochs):
        for k in range(p.num_minibatches):
            rows = minibatch_rows(exp, k, p.num_minibatches)
            if train_actor:
                tokens = seqs = ptx_tokens = 0.0
                if last:
                    tokens, seqs = _global_counts(exp.loss_mask[rows.to(exp.loss_mask.device)], ctx.device)
                measure = 0 if not (from_rollout and epoch == 0) else 2 if k == 0 else 1
                more = ("critic_mask",) + (("rollout_logprobs",) if measure == 2 else ()) if measure else ()
                mbs = exp.microbatches(rows, t.micro_batch_size, keys + more if last else ())
                if run.ptx is not None:
                    extra_mbs = ptx_microbatches(run, cfg, ctx.device)
                    if last:
                        ptx_tokens, _ = _global_counts(torch.cat([m["loss_mask"] for m in extra_mbs]), ctx.device)
                    mbs += extra_mbs
                actor.train()
                actor.set_lm_output(cfg.generation.temperature, entropy=p.entropy_coef > 0 or measure > 0)
                loss_fn = actor_loss_fn(cfg, run.kl_ctl.value, tokens, seqs, ptx_tokens, poison, measure, mismatch_max)
                _sum_stats(forward_backward(actor, mbs, loss_fn, cfg.model.hidden_size, _dtype(actor), ctx.device), sums)
                st = optimizer_step(actor, run.optimizers["actor"], cfg, extra["actor_updates"], total_steps=actor_total,
                                    on_stepped=report_at_step("actor"))  # fmt: skip
                steps["actor"].append(st)
                check_skip(run.state, st["skipped_step"], cfg, f"ppo iteration {iteration}: actor",
                           extra["actor_updates"] + 1, "actor")  # fmt: skip
                if not st["skipped_step"]:
                    extra["actor_updates"] += 1
                    if run.ema is not None:
                        ema_update(list(run.ema.parameters()), list(actor.parameters()), p.ema_decay)
            if critic is not None:
                tokens = 0.0
                if last:
                    tokens, _ = _global_counts(exp.critic_mask[rows.to(exp.action_mask.device)], ctx.device)
                mbs = exp.microbatches(rows, t.micro_batch_size, ("values", "returns", "critic_mask") if last else ())
                critic.train()
                loss_fn = critic_loss_fn(cfg, tokens)
                _sum_stats(forward_backward(critic, mbs, loss_fn, cfg.model.hidden_size, _dtype(critic), ctx.device),
                           sums)  # fmt: skip
                st = optimizer_step(critic, run.optimizers["critic"], cfg, extra["critic_updates"],
                                    cfg.critic_optimizer, cfg.critic_scheduler, critic_total,
                                    on_stepped=report_at_step("critic"))  # fmt: skip
                steps["critic"].append(st)
                check_skip(run.state, st["skipped_step"], cfg, f"ppo iteration {iteration}: critic",
                           extra["critic_updates"] + 1, "critic")  # fmt: skip
                if not st["skipped_step"]:
                    extra["critic_updates"] += 1
    keys_out = ("pg_loss_sum", "clipped_sum", "approx_kl_sum", "actor_tokens", "ptx_nll_sum", "value_loss_sum",
                "value_clipped_sum", "critic_tokens", "m_entropy_sum", "m_tokens", "m_mismatch_sum",
                "m_mismatch_tokens")  # fmt: skip
    local = [float(sums.get(k, 0.0)) for k in keys_out] if last else [0.0] * len(keys_out)
    s = dict(zip(keys_out, reduce_last_stage_scalars(local)))
    out: dict[str, float] = {}
    if from_rollout and train_actor:  # what experience making measures in 'recompute' mode
        local_max = [float(torch.stack(mismatch_max).max()) if last and mismatch_max else 0.0]
        (mx,) = reduce_last_stage_scalars(local_max, torch.distributed.ReduceOp.MAX)
        out.update(entropy=s["m_entropy_sum"] / max(s["m_tokens"], 1.0), logprob_mismatch_max=mx,
                   logprob_mismatch_mean=s["m_mismatch_sum"] / max(s["m_mismatch_tokens"], 1.0))  # fmt: skip
    if train_actor:
        n = max(s["actor_tokens"], 1.0)
        out.update(pg_loss=s["pg_loss_sum"] / n, clip_fraction=s["clipped_sum"] / n, approx_kl=s["approx_kl_sum"] / n)
        out.update(actor_grad_norm=steps["actor"][-1]["grad_norm"], actor_lr=steps["actor"][-1]["lr"])
        if run.ptx is not None:
            out["ptx_nll_per_minibatch"] = s["ptx_nll_sum"] / steps_per_iter
    if critic is not None:
        n = max(s["critic_tokens"], 1.0)
        out.update(value_loss=s["value_loss_sum"] / n, value_clip_fraction=s["value_clipped_sum"] / n)
        out.update(critic_grad_norm=steps["critic"][-1]["grad_norm"], critic_lr=steps["critic"][-1]["lr"])
    out["skipped_steps"] = float(sum(st["skipped_step"] for v in steps.values() for st in v))
    return out


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


# ----------------------------------------------------------------------------------------------------------------------
# Metrics of one iteration's experience


EXP_KEYS = ("seqs", "valid", "raw_sum", "raw_sq", "score_sum", "score_sq", "len_sum", "truncated", "kl_sum", "tokens", "entropy_sum", "mismatch_sum", "adv_sum", "ret_sum", "ret_sq", "res_sum", "res_sq",
            "value_tokens", "groups", "flat_groups")  # fmt: skip


def _spread(sq: float, total: float, count: float) -> float:
    """Standard deviation from a sum of squares and a sum over ``count`` values (0 for no values)."""
    count = max(count, 1.0)
    return max(sq / count - (total / count) ** 2, 0.0) ** 0.5


def experience_stats(exp: Experience, entropy: torch.Tensor | None, last: bool, measured_here: bool = True,
                     group_size: int = 1) -> dict[str, float]:  # fmt: skip
    """The iteration's experience metrics, reduced over DP (``group_size``: samples per prompt)."""
    if not last:
        local = [0.0] * len(EXP_KEYS)
        mx = [0.0]
    else:
        v = exp.valid
        vf = v.double()
        m = (exp.action_mask * vf[:, None].float()).double()
        raw, sc = exp.raw_scores.double(), exp.scores.double()
        mismatch = (exp.rollout_logprobs.to(m.device) - exp.old_logprobs).abs().double() * m
        vals = {
            "seqs": float(exp.batch_size), "valid": vf.sum(), "raw_sum": (raw * vf).sum(), "raw_sq": (raw**2 * vf).sum(),
            "score_sum": (sc * vf).sum(), "score_sq": (sc**2 * vf).sum(),
            "len_sum": (exp.response_length.double() * vf).sum(), "truncated": (exp.truncated.double() * vf).sum(),
            "kl_sum": (exp.kl.double() * m).sum(), "tokens": m.sum(),
            "entropy_sum": (entropy.double() * m).sum() if entropy is not None else 0.0, "mismatch_sum": mismatch.sum(),
            "adv_sum": (exp.advantages.double() * m).sum(),
            "ret_sum": 0.0, "ret_sq": 0.0, "res_sum": 0.0, "res_sq": 0.0, "value_tokens": 0.0,
            "groups": exp.batch_size / group_size,
            "flat_groups": flat_groups(exp.scores, v, group_size).sum() if group_size > 1 else 0.0,
        }  # fmt: skip
        if exp.returns is not None:
            r, res = exp.returns.double(), (exp.returns - exp.values).double()
            vals.update(ret_sum=(r * m).sum(), ret_sq=(r**2 * m).sum(), res_sum=(res * m).sum(),
                        res_sq=(res**2 * m).sum(), value_tokens=m.sum())  # fmt: skip
        local = [float(vals[k]) for k in EXP_KEYS]
        mx = [float(mismatch.max()) if mismatch.numel() else 0.0]
    s = dict(zip(EXP_KEYS, reduce_last_stage_scalars(local)))
    (mismatch_max,) = reduce_last_stage_scalars(mx, torch.distributed.ReduceOp.MAX)
    n, tok = max(s["valid"], 1.0), max(s["tokens"], 1.0)

    out = {
        "reward_raw_mean": s["raw_sum"] / n, "reward_raw_std": _spread(s["raw_sq"], s["raw_sum"], n),
        "reward_mean": s["score_sum"] / n, "reward_std": _spread(s["score_sq"], s["score_sum"], n),
        "kl_per_sequence": s["kl_sum"] / n, "kl_per_token": s["kl_sum"] / tok,
        "entropy": s["entropy_sum"] / tok, "response_length": s["len_sum"] / n, "truncation_rate": s["truncated"] / n,
        "logprob_mismatch_mean": s["mismatch_sum"] / tok, "logprob_mismatch_max": mismatch_max,
        "advantage_mean": s["adv_sum"] / tok, "dropped_samples": s["seqs"] - s["valid"],
    }  # fmt: skip
    if group_size > 1:  # prompts whose samples all scored the same: no signal for GRPO/RLOO (all solved, or none)
        out["flat_group_fraction"] = s["flat_groups"] / max(s["groups"], 1.0)
    if not measured_here:  # ppo.old_logprobs=rollout: the update measures them (none during critic warm-up)
        for k in ("entropy", "logprob_mismatch_mean", "logprob_mismatch_max"):
            out.pop(k)
    if s["value_tokens"] > 0:
        vt = s["value_tokens"]
        var_r = _spread(s["ret_sq"], s["ret_sum"], vt) ** 2
        var_res = _spread(s["res_sq"], s["res_sum"], vt) ** 2
        out["explained_variance"] = 1.0 - var_res / var_r if var_r > 0 else 0.0
    out["_global_seqs"] = s["seqs"]
    return out


EVAL_SEED_OFFSET = 1 << 31
"""Evaluation's sampling seeds sit this far from the rollouts' (iteration i's seed is a base + i + 1): with
``ppo.eval_temperature > 0`` its samples share no noise with any training iteration's."""


def evaluate(run: PPORun, cfg: RunConfig, ctx: ParallelContext, iteration: int) -> dict[str, float]:
    """Held-out evaluation of the actor: ``training.eval_samples`` prompts of the eval split (cycled up to a whole
    number per DP rank), one response each at ``ppo.eval_temperature`` (0: greedy) through the same in-layout
    generation as the rollouts, scored by ``ppo.eval_reward_function`` when set, else by what training scores with
    (the reward model, or ``ppo.reward_function``). Raw scores: no normaliser, KL or truncation penalty. Reads no
    training RNG and changes no state, so a run trains identically with and without it (tested)."""
    p, t, device = cfg.ppo, cfg.training, ctx.device
    data, dp = run.prompts.eval, ctx.layout.dp
    n = max(dp, min(t.eval_samples, len(data)) // dp * dp)
    mine = dp_slice([i % len(data) for i in range(n)])
    last = ps.is_pipeline_last_stage()
    start = time.perf_counter()
    exp, _ = rollout(run.roles["actor"], [list(data[i]) for i in mine], mine, ctx.dp_rank * len(mine), cfg,
                     iteration, run.tokenizer.eos_id, run.tokenizer.pad_id, device, n_samples=1,
                     temperature=p.eval_temperature, seed_offset=EVAL_SEED_OFFSET)  # fmt: skip
    if run.eval_fn is not None:
        scores = run.eval_fn(exp, device) if last else None
    else:  # the reward model, back from host memory for this pass only
        model = run.roles["reward"]
        residency.reload(model, device)
        model.eval()
        out = forward_rows(model, exp, t.micro_batch_size, lambda o, mb: o.float(), cfg, device)
        if p.offload_frozen:
            residency.offload(model)
        scores = torch.cat(out) if last else None
    local = [0.0] * 5
    if last:
        ok = torch.isfinite(scores)
        good = torch.where(ok, scores, 0.0).double()
        local = [float(good.sum()), float((good * good).sum()), float(ok.sum()),
                 float(exp.response_length.sum()), float(exp.truncated.sum())]  # fmt: skip
    total, total_sq, count, length, truncated = reduce_last_stage_scalars(local)
    mean = total / max(count, 1.0)
    out_stats = {
        "eval_reward_mean": mean,
        "eval_reward_std": _spread(total_sq, total, count),
        "eval_response_length": length / n,
        "eval_truncation_rate": truncated / n,
        "eval_dropped_samples": n - count,
        "eval_samples": float(n),
    }
    if run.eval_fn is not None and len(run.eval_fn.parts) > 1:
        out_stats.update({f"eval_{k}": v for k, v in reward_function_stats(run.eval_fn).items()
                          if k.startswith("reward_fn_")})  # fmt: skip
    (seconds,) = reduce_last_stage_scalars([time.perf_counter() - start], torch.distributed.ReduceOp.MAX)
    out_stats["time_eval_s"] = seconds
    how = "greedy" if p.eval_temperature == 0 else f"temperature {p.eval_temperature}"
    by = run.eval_fn.spec if run.eval_fn is not None else "the reward model"
    log_main(f"ppo eval at iteration {iteration}: reward {mean:.4f} over {n} held-out prompts ({how}, scored by {by})"
             f", response length {length / n:.1f}")  # fmt: skip
    return out_stats


def eval_due(cfg: RunConfig, step: int) -> bool:
    t = cfg.training
    return t.eval_interval > 0 and (step % t.eval_interval == 0 or step == t.train_steps)


def reward_function_stats(fn: RewardFunction) -> dict[str, float]:
    """The reward functions' share of the experience phase (the slowest DP rank) and, with several, each one's mean
    finite score over the iteration (``reward_fn_<name>_mean``), reduced over DP."""
    (seconds,) = reduce_last_stage_scalars([fn.seconds], torch.distributed.ReduceOp.MAX)
    out = {"time_reward_function_s": seconds}
    if len(fn.parts) > 1:
        sums = reduce_last_stage_scalars([v for part in fn.parts for v in part])
        for name, total, count in zip(fn.names, sums[0::2], sums[1::2]):
            if count:  # a function that scored nothing this iteration has no mean
                out[f"reward_fn_{name}_mean"] = total / count
    return out


def warn_dropped(exp: Experience, run: PPORun, batch: list[int], n: int, total_seqs: int, last: bool, device) -> None:
    """Name the prompts whose reward was not finite (their samples were dropped); ``batch``: the iteration's global
    prompt indices (sequence id // n indexes it)."""
    flags = torch.zeros(total_seqs, dtype=torch.float64, device=device)
    if last:
        bad = exp.seq_ids[~exp.valid.to(exp.seq_ids.device)]
        flags[bad.to(device)] = 1.0
    comm.all_reduce_dp(flags)
    comm.broadcast_from_last_stage(flags)
    for sid in flags.nonzero().flatten().tolist():
        prompt_idx = batch[sid // n]
        text = run.tokenizer.decode(list(run.prompts.train[prompt_idx]))
        log_main(f"warning: non-finite reward for sample {sid % n} of prompt {prompt_idx} ({text!r}): dropped")


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start


def next_prompts(run: PPORun, cfg: RunConfig) -> tuple[list[int], list[int]]:
    """The global prompt indices of this iteration and this DP rank's share."""
    from mrlhf.data.datasets import global_batch_indices

    t = cfg.training
    indices = global_batch_indices(len(run.prompts.train), t.seed, run.state.consumed_samples, t.global_batch_size)
    return indices, dp_slice(indices)


def memory_report(run: PPORun, device, kv_bytes: float = 0.0, peak: bool = True) -> dict[str, float]:
    """Bytes each role (and the EMA copy of the actor) holds on ``device`` now, by kind; ``mrlhf plan`` predicts
    the same keys (``mrlhf/plan.py``)."""
    report = {}
    held = dict(run.roles, **({"ema_actor": run.ema} if run.ema is not None else {}))
    for r, model in held.items():
        b = residency.device_bytes(model, device, run.optimizers.get(r))
        for kind, v in b.items():
            report[f"mem_{r}_{kind}_bytes"] = float(v)
    report["mem_kv_cache_bytes"] = float(kv_bytes)
    return {**report, **(cuda_peak(device) if peak else {})}


def cuda_peak(device) -> dict[str, float]:
    """The phase's CUDA peak so far (then reset: the next phase counts afresh); nothing off CUDA."""
    if device.type != "cuda":
        return {}
    peak = float(torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
    return {"mem_cuda_max_allocated_bytes": peak}


def train_ppo(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    """Run ``training.train_steps`` PPO iterations; returns per-iteration records, the trained roles and their
    optimizers."""
    p, t = cfg.ppo, cfg.training
    if not cfg.generation.temperature > 0:
        raise ConfigError("ppo needs generation.temperature > 0 (rollouts are sampled; greedy has no log-probs)")
    cfg.validate_ppo_batches(ctx.layout.dp)
    run = prepare_ppo(cfg, ctx)
    state, last = run.state, ps.is_pipeline_last_stage()
    metrics = MetricsWriter(cfg, ctx, t.train_steps, state.step)
    log_main(
        f"PPO ({p.estimator}): {len(run.prompts.train)} prompts, {t.global_batch_size} x {p.n_samples} samples per "
        f"iteration, layout tp={ctx.layout.tp} pp={ctx.layout.pp} dp={ctx.layout.dp}, roles {sorted(run.roles)}, "
        f"iterations {state.step}->{t.train_steps}"
    )
    records: list[dict[str, Any]] = []
    device = ctx.device
    reduce = comm.all_reduce_dp
    if state.step == 0 and t.eval_interval > 0 and p.eval_before_train:  # the starting policy, iteration 0
        record = {"iteration": 0, **evaluate(run, cfg, ctx, 0)}
        records.append(record)
        metrics.write(record)
    while state.step < t.train_steps:
        timer, start = PhaseTimer(), time.perf_counter()
        mem: dict[str, dict[str, float]] = {}  # per-phase memory, reported on the first and the last iteration
        mem_due = state.step == 0 or state.step + 1 == t.train_steps
        if mem_due and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # each phase's peak, not one of an earlier iteration
        batch, mine = next_prompts(run, cfg)
        prompts = [list(run.prompts.train[i]) for i in mine]
        first_seq = ctx.dp_rank * len(mine) * p.n_samples
        with timer("generate"):
            exp, gen_stats = rollout(run.roles["actor"], prompts, mine, first_seq, cfg, state.step,
                                     run.tokenizer.eos_id, run.tokenizer.pad_id, device)  # fmt: skip
        if mem_due:
            mem["generate"] = memory_report(run, device, gen_stats.get("kv_cache_bytes", 0.0))

        def report_resident(mem=mem) -> None:  # while every role is on the device
            mem["experience"] = memory_report(run, device)

        with timer("experience"):
            entropy = score(exp, run.roles, cfg, device, last, report_resident if mem_due else None, run.reward_fn)
            if last:
                shape(exp, cfg, run.kl_ctl.value, run.normalizer, reduce)
        record = experience_stats(exp, entropy, last, p.old_logprobs == "recompute", p.n_samples)
        if run.reward_fn is not None:
            record.update(reward_function_stats(run.reward_fn))
        total_seqs = int(record.pop("_global_seqs"))
        if record["dropped_samples"] > 0:
            warn_dropped(exp, run, batch, p.n_samples, total_seqs, last, device)
        with timer("train"):
            mem_train: dict[str, float] | None = {} if mem_due else None
            with optimizers_on_device(run, cfg, device):
                record.update(update(run, exp, cfg, ctx, last, mem_train))
        if mem_train is not None:  # taken at each model's first step, while its gradients exist; the CUDA peak now
            mem["train"] = {**(mem_train or memory_report(run, device, peak=False)), **cuda_peak(device)}
        sync_controllers(run, record, total_seqs, device)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        if record["truncation_rate"] > p.truncation_warn:
            log_main(f"warning: ppo iteration {state.step}: {record['truncation_rate']:.0%} of responses hit "
                     f"generation.max_new_tokens without EOS (reward signal may be lost)")  # fmt: skip
        record = {"iteration": state.step, **record, "kl_coef": run.kl_ctl.value,
                  "skipped_steps_total": float(state.extra.get("skipped_steps", 0)),
                  "generated_tokens": record["response_length"] * total_seqs,
                  **{f"time_{k}_s": v for k, v in timer.seconds.items()},
                  "iteration_time_s": time.perf_counter() - start, "consumed_prompts": state.consumed_samples}  # fmt: skip
        for phase, rep in mem.items():
            record.update({f"{phase}_{k}": v for k, v in rep.items()})
        evaluated = eval_due(cfg, state.step)
        if evaluated:
            record.update(evaluate(run, cfg, ctx, state.step))
        records.append(record)
        if state.step % cfg.logging.log_interval == 0 or state.step == t.train_steps or evaluated:
            metrics.write(record)
        save(run, cfg, ctx, final=state.step == t.train_steps)
        maybe_fault(f"after_step:{state.step}")
    metrics.close()
    for opt in run.optimizers.values():  # the caller gets usable optimizers (ppo.offload_optimizer kept them on host)
        residency.reload_optimizer(opt, device)
    if records:
        r = records[-1]
        log_main(f"PPO done: iteration {state.step} reward {r['reward_raw_mean']:.4f} kl {r['kl_per_sequence']:.4f} "
                 f"skipped steps {state.extra.get('skipped_steps', 0)}")  # fmt: skip
    return {"records": records, "roles": run.roles, "ema": run.ema, "state": state, "optimizers": run.optimizers,
            "output_dir": os.path.abspath(t.output_dir)}  # fmt: skip


def sync_controllers(run: PPORun, record: dict[str, float], total_seqs: int, device) -> None:
    """KL controller (from the reduced KL, identical on every rank) and the reward normaliser (updated on the last
    stage, broadcast so rank 0 saves what the last stage uses)."""
    run.kl_ctl.update(record["kl_per_sequence"], total_seqs)
    sd = run.normalizer.state_dict()
    keys = sorted(k for k, v in sd.items() if isinstance(v, float))
    t = torch.tensor([sd[k] for k in keys], dtype=torch.float64, device=device)
    comm.broadcast_from_last_stage(t)
    sd.update(dict(zip(keys, t.tolist())))
    run.normalizer.load_state_dict(sd)
    run.state.extra["kl_controller"] = run.kl_ctl.state_dict()
    run.state.extra["reward_normalizer"] = run.normalizer.state_dict()


@contextlib.contextmanager
def optimizers_on_device(run: PPORun, cfg: RunConfig, device):
    """With ``ppo.offload_optimizer``: the trained models' optimizer state on the device for the block, then back to
    host memory (state AdamW creates in the block goes with it)."""
    if not cfg.ppo.offload_optimizer:
        yield
        return
    for opt in run.optimizers.values():
        residency.reload_optimizer(opt, device)
    try:
        yield
    finally:
        for opt in run.optimizers.values():
            residency.offload_optimizer(opt)


def save(run: PPORun, cfg: RunConfig, ctx: ParallelContext, final: bool) -> None:
    if not save_due(cfg, run.state, final):
        return
    offloaded = [r for r in FROZEN if r in run.saved and residency.is_offloaded(run.roles[r])]
    for r in offloaded:  # frozen roles that the checkpoint holds are saved from the device copy
        residency.reload(run.roles[r], ctx.device)
    with optimizers_on_device(run, cfg, ctx.device):  # so is offloaded optimizer state
        maybe_save(cfg, run.state, run.saved, run.optimizers, run.tokenizer.hash, final)
    for r in offloaded:
        residency.offload(run.roles[r])
