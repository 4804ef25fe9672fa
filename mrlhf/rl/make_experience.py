"""Rollouts -> Experience: generate in the training layout, then score with the four roles in forward-only passes.

1. ``rollout``: the actor generates ``n_samples`` responses for each of this DP rank's prompts with the interleaved
   PP ring and the KV cache (``generation.Generator``). Sampling noise is keyed by global sequence id and by the
   iteration, so every layout draws the same samples. The cache lives only inside ``Generator.generate``.
2. ``score``: forward-only passes over microbatches of ``training.micro_batch_size`` rows -- the same shapes as the
   training passes -- give the actor's old log-probs (and entropy), the reference log-probs, the critic's values and
   the reward model's score at the last response token. The reference and reward models come back from host memory
   for this phase only.
3. ``shape``: reward normalisation and clipping, the truncation policy, non-finite rewards dropped, the KL penalty,
   and the advantages of the configured estimator (``rl.advantages``).

Everything after generation is computed on the last pipeline stage, where the heads are; reductions over DP run
inside that stage's DP group.
"""

from __future__ import annotations

import dataclasses

import torch

from mrlhf.config import RunConfig
from mrlhf.generation.generate import GenerationConfig, Generator
from mrlhf.models import residency
from mrlhf.parallel import comm
from mrlhf.parallel.schedule import forward_only
from mrlhf.rl.advantages import RewardNormalizer, compute_advantages, overlong_penalty
from mrlhf.rl.experience import Experience, build_rollout
from mrlhf.rl.kl import kl_penalty
from mrlhf.testing_faults import fault_ids


def iteration_seed(generation_seed: int, training_seed: int, iteration: int) -> int:
    """Sampling seed of PPO iteration ``iteration``: distinct per iteration, fixed by the generation and run seeds."""
    return ((generation_seed * 1_000_003 + training_seed) << 32) + iteration + 1


def rollout(
    actor,
    prompts: list[list[int]],
    prompt_index: list[int],
    first_seq_id: int,
    cfg: RunConfig,
    iteration: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    n_samples: int | None = None,
    temperature: float | None = None,
    seed_offset: int = 0,
) -> tuple[Experience, dict[str, float]]:
    """This DP rank's prompts -> rollout fields (every stage). ``first_seq_id``: global id of this rank's first
    sequence. Returns the record and the generator's statistics. ``n_samples`` / ``temperature`` (held-out
    evaluation) replace ``ppo.n_samples`` / ``generation.temperature``; ``seed_offset`` moves the sampling noise to
    another stream (evaluation: not the noise of the training rollouts)."""
    g = cfg.generation
    n = cfg.ppo.n_samples if n_samples is None else n_samples
    base = GenerationConfig.from_section(g, eos_id)
    seed = iteration_seed(g.seed, cfg.training.seed, iteration) + seed_offset
    sampling = dataclasses.replace(base.sampling, seed=seed)
    if temperature is not None:
        sampling = dataclasses.replace(sampling, temperature=temperature)
    engine_cfg = dataclasses.replace(  # rollouts: fresh noise per iteration, stop at EOS only (token ids, no text)
        base, sampling=sampling, stop_token_ids=() if g.ignore_eos else (eos_id,), stop_strings=(),
    )  # fmt: skip
    repeated = [p for p in prompts for _ in range(n)]  # the n samples of a prompt sit next to each other
    actor.eval()
    out = Generator(actor, engine_cfg, pad_id).generate(repeated, seq_id_offset=first_seq_id)
    responses, logprobs = out.tokens, out.logprobs
    for i in fault_ids("MRLHF_FAULT_EMPTY_RESPONSE", first_seq_id, len(repeated)):  # tests: an immediate EOS
        responses[i], logprobs[i] = [eos_id], [logprobs[i][0] if logprobs[i] else 0.0]
    truncated = [not (r and r[-1] == eos_id) for r in responses]
    # one width for every microbatch of every pass, on every DP rank
    width = torch.tensor([max(len(p) + len(r) for p, r in zip(repeated, responses))], dtype=torch.long, device=device)
    comm.all_reduce_dp(width, op=torch.distributed.ReduceOp.MAX)
    exp = build_rollout(
        repeated, responses, logprobs, truncated,
        seq_ids=list(range(first_seq_id, first_seq_id + len(repeated))),
        prompt_index=[idx for idx in prompt_index for _ in range(n)],
        width=int(width), pad_id=pad_id, device=device,
    )  # fmt: skip
    return exp, out.stats


def forward_rows(model, exp: Experience, size: int, collect, cfg: RunConfig, device) -> list:
    """A forward-only pass of ``model`` over every row of ``exp`` in microbatches of ``size``; ``collect(output,
    microbatch)`` per microbatch on the last stage."""
    rows = torch.arange(exp.batch_size)
    dtype = next(model.parameters()).dtype
    return forward_only(model, exp.microbatches(rows, size, ()), collect, cfg.model.hidden_size, dtype, device)


def score(
    exp: Experience, roles: dict, cfg: RunConfig, device: torch.device, last_stage: bool, on_resident=None,
    reward_fn=None,
) -> torch.Tensor | None:
    """Fill old/ref log-probs, values and raw scores (last stage). Returns the actor's per-token entropy [b, W] on the
    last stage (for metrics), else None (also with ``ppo.old_logprobs=rollout``: no actor pass runs here).
    ``on_resident()`` runs while every role is on the device (memory report). ``reward_fn``
    (``rl.reward_fn.RewardFunction``, with ``ppo.reward_function``) scores instead of the reward model."""
    size, temp = cfg.training.micro_batch_size, cfg.generation.temperature
    actor_out = None
    if cfg.ppo.old_logprobs == "recompute":  # else the rollout's own log-probs serve (ppo.old_logprobs=rollout)
        actor = roles["actor"]
        actor.eval()
        actor.set_lm_output(temp, entropy=True)
        actor_out = forward_rows(actor, exp, size, lambda o, mb: (o[0].float(), o[1].float()), cfg, device)
    frozen = [roles[r] for r in ("reference", "reward") if r in roles]
    for model in frozen:
        residency.reload(model, device)
    roles["reference"].set_lm_output(temp)
    ref_out = forward_rows(roles["reference"], exp, size, lambda o, mb: o.float(), cfg, device)
    reward_out = None
    if reward_fn is None:
        reward_out = forward_rows(roles["reward"], exp, size, lambda o, mb: o.float(), cfg, device)
    if on_resident is not None:
        on_resident()
    if cfg.ppo.offload_frozen:
        for model in frozen:
            residency.offload(model)
    values_out = None
    if "critic" in roles:
        roles["critic"].eval()
        values_out = forward_rows(roles["critic"], exp, size, lambda o, mb: o.float(), cfg, device)
    if not last_stage:
        return None
    exp.ref_logprobs = torch.cat(ref_out) * exp.action_mask
    exp.raw_scores = reward_fn(exp, device) if reward_fn is not None else torch.cat(reward_out)
    if values_out is not None:
        exp.values = torch.cat(values_out) * exp.action_mask
    if actor_out is None:
        exp.old_logprobs = exp.rollout_logprobs.to(exp.action_mask.device) * exp.action_mask
        return None  # entropy and the log-prob mismatch are measured by the update's first forwards instead
    exp.old_logprobs = torch.cat([lp for lp, _ in actor_out]) * exp.action_mask
    return torch.cat([ent for _, ent in actor_out])


def shape(
    exp: Experience,
    cfg: RunConfig,
    kl_coef: float,
    normalizer: RewardNormalizer,
    reduce,
) -> None:
    """Last stage: scores, KL, rewards, advantages and returns of ``exp`` (in place).

    A non-finite raw score drops its sequence: it leaves every loss and statistic (its row's masks become 0), group
    baselines are taken from the valid rows only (``valid=``), and its score is replaced by the mean of the finite
    scores of its group (so no NaN flows anywhere).
    """
    p = cfg.ppo
    raw = exp.raw_scores.clone()
    for i in fault_ids("MRLHF_FAULT_NAN_REWARD", int(exp.seq_ids[0]), exp.batch_size):  # tests: a broken reward
        raw[i] = float("nan")
    valid = torch.isfinite(raw)
    n = p.n_samples
    groups = raw.view(-1, n)
    ok = valid.view(-1, n)
    fill = torch.where(ok, groups, 0.0).sum(-1) / ok.sum(-1).clamp(min=1)  # mean of the finite scores of each group
    raw = torch.where(valid, raw, fill.repeat_interleave(n))
    exp.raw_scores = raw
    normalizer.update(raw[valid], reduce=reduce)
    scores = normalizer.normalize(raw) if p.reward_normalize else raw
    if p.reward_clip is not None and not p.reward_normalize:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    if p.truncation == "penalty":
        scores = scores - p.truncation_penalty * exp.truncated.float()
    elif p.truncation == "overlong":
        lengths = exp.response_length.to(scores.device)
        scores = scores - overlong_penalty(lengths, cfg.generation.max_new_tokens, p.overlong_buffer,
                                           p.truncation_penalty)  # fmt: skip
    exp.scores = scores
    exp.valid = valid
    row_ok = valid.float()[:, None]
    exp.loss_mask = exp.action_mask * row_ok
    if p.truncation == "mask":
        exp.loss_mask = exp.loss_mask * (~exp.truncated).float()[:, None]
    critic_mask = exp.critic_mask = exp.action_mask * row_ok
    exp.kl = kl_penalty(p.kl_estimator, exp.old_logprobs, exp.ref_logprobs) * exp.action_mask
    kl_rewards = -kl_coef * exp.kl if p.kl_placement == "reward" else torch.zeros_like(exp.kl)
    advantages, returns = compute_advantages(
        p.estimator, scores, kl_rewards, critic_mask, exp.values,
        gamma=p.gamma, lam=p.lam, group_size=n, eps=p.group_eps, scale_by_std=p.group_scale_by_std,
        whiten=p.whiten_advantages, reduce=reduce, valid=valid,
    )  # fmt: skip
    exp.advantages = advantages * exp.loss_mask
    exp.returns = returns
