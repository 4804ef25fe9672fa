"""Rank functions of the PPO distributed tests: a tiny 4-layer model on the demo prompts, a few iterations."""

from __future__ import annotations

import os

import torch
from sft_runs import ROOT, TINY

DEMO = os.path.join(ROOT, "mrlhf", "assets", "demo")


def ppo_overrides(out: str, layout: dict[str, int], extra: list[str]) -> list[str]:
    return [
        "model.num_layers=4",
        f"parallel.tp={layout.get('tp', 1)}",
        f"parallel.pp={layout.get('pp', 1)}",
        f"data.train_path={DEMO}/prompts_train.jsonl",
        "data.eval_path=null",
        f"data.tokenizer_path={DEMO}/tokenizer.model",
        "data.max_seq_len=64",
        "data.max_prompt_len=48",
        "training.train_steps=1",
        "training.global_batch_size=8",  # prompts per iteration
        "training.micro_batch_size=4",
        "training.eval_interval=0",
        "logging.progress_bar=false",
        "generation.max_new_tokens=8",
        "generation.micro_batch_size=4",
        "ppo.n_samples=2",
        "ppo.num_minibatches=2",
        "ppo.kl_coef=0.1",
        # Adam's first step is lr * g / (|g| + eps): with eps 1e-8, an element whose gradient is ~1e-6 turns a
        # relative float difference of the gradient (1e-7 between layouts) into the same relative difference of a
        # full lr-sized step; measured, TP2 then differs from TP1 by 2.9e-5 of a tensor's max (eps 1e-4: 9e-7). The
        # average |gradient| here is ~5e-3, so eps 1e-4 still leaves Adam's normalisation in place for the rest.
        "optimizer.lr=5e-4",
        "optimizer.min_lr=0",
        "optimizer.eps=1e-4",
        "critic_optimizer.lr=5e-4",
        "critic_optimizer.eps=1e-4",
        "scheduler.warmup_steps=0",
        "checkpoint.enabled=false",
        f"training.output_dir={out}",
        *extra,
    ]


def _params(model) -> dict[str, tuple[torch.Tensor, bool, int]]:
    """Global name -> (local shard, TP-partitioned?, partition dim)."""
    out = {}
    for n, p in model.named_parameters():
        name = model.global_name(n)
        out[name] = (
            p.detach().clone(),
            bool(getattr(p, "tensor_model_parallel", False)),
            getattr(p, "partition_dim", 0),
        )
    return out


def ppo_rank(rank: int, out: str, layout: dict[str, int], extra: list[str], initial: bool = False) -> dict:
    """Run PPO; return the per-iteration records, the trained roles' parameters (local shards, global names), their
    optimizers' state and this rank's coordinates. ``initial``: also the parameters a fresh build starts from (random
    init runs)."""
    from megatron.core import parallel_state as ps

    from mrlhf.config import load_config
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.ppo import train_ppo

    cfg = load_config(TINY, ppo_overrides(out, layout, extra))
    ctx = init_distributed(cfg, "ppo")
    result = train_ppo(cfg, ctx)
    roles = result["roles"]
    params = {r: _params(roles[r]) for r in ("actor", "critic") if r in roles}
    if result["ema"] is not None:
        params["ema_actor"] = _params(result["ema"])
    res = {
        "records": result["records"],
        "params": params,
        "coord": (
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(),
        ),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "extra": result["state"].extra,
        "roles": sorted(roles),
        "optimizers": {r: o.state_dict() for r, o in result["optimizers"].items()},
    }
    if initial:
        vocab = roles["actor"].backbone.real_vocab_size
        res["initial"] = {r: _params(build_role(cfg, r, vocab)) for r in params if r != "ema_actor"}
    return res


def ppo_error_rank(rank: int, out: str, layout: dict[str, int], extra: list[str]) -> str | None:
    """Run PPO expecting a user-facing error; return its one-line message (None if the run finished)."""
    from mrlhf.errors import MrlhfError

    try:
        ppo_rank(rank, out, layout, extra)
    except MrlhfError as e:
        return str(e)
    return None


def prepare_rank(rank: int, out: str, layout: dict[str, int], extra: list[str], sft: str, rm: str) -> dict:
    """Build the PPO roles from an SFT and an RM checkpoint; compare each with the checkpoint it came from."""
    from mrlhf import checkpoint as ckpt
    from mrlhf.config import load_config
    from mrlhf.models import residency
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.ppo import prepare_ppo

    cfg = load_config(
        TINY, ppo_overrides(out, layout, [f"ppo.actor_load_dir={sft}", f"ppo.critic_load_dir={rm}", *extra])
    )
    ctx = init_distributed(cfg, "ppo")
    run = prepare_ppo(cfg, ctx)
    vocab = run.roles["actor"].backbone.real_vocab_size
    offloaded_after_prepare = {r: residency.is_offloaded(run.roles[r]) for r in ("reference", "reward")}
    diffs = {}
    for role, src, source_role in (("actor", sft, "actor"), ("reference", sft, "actor"), ("critic", rm, "reward"),
                                   ("reward", rm, "reward")):  # fmt: skip
        if role not in run.roles:
            continue
        want = build_role(cfg, role, vocab, seed=4321)  # another seed: only a load makes them equal
        ckpt.load_model(ckpt.latest_checkpoint(src), role, want, source_role)
        got = run.roles[role]
        if residency.is_offloaded(got):
            residency.reload(got, ctx.device)
        diffs[role] = max(
            float((a - b).abs().max()) for a, b in zip(got.state_dict().values(), want.state_dict().values())
            if torch.is_tensor(a) and a.numel()
        )  # fmt: skip
    return {"diffs": diffs, "normalizer": run.normalizer.state_dict(), "offloaded": offloaded_after_prepare,
            "roles": sorted(run.roles)}  # fmt: skip


def rm_checkpoint_rank(rank: int, out: str, sft: str) -> None:
    """A 2-step demo RM checkpoint (from the SFT one) for the PPO critic and reward."""
    from stage_runs import stage_overrides

    from mrlhf.config import load_config
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.rm import train_rm

    cfg = load_config(TINY, stage_overrides(out, {}, ["training.train_steps=2", f"checkpoint.load_dir={sft}"]))
    train_rm(cfg, init_distributed(cfg))


def kv_cache_lifetime_rank(rank: int, out: str, layout: dict[str, int], extra: list[str]) -> dict:
    """One PPO rollout (8 demo prompts x ppo.n_samples) with every KVCache the generator allocates tracked; what is
    left of the caches once ``rollout`` has returned (its Experience still alive).

    The caches are held here by strong references, so only an explicit release inside generation frees their
    storage; weak references watch their K/V tensors and every [B, L, G, D] view handed to attention."""
    import gc
    import weakref

    from mrlhf.config import load_config
    from mrlhf.generation import generate
    from mrlhf.models.roles import build_role
    from mrlhf.ops.kv_cache import KVCache
    from mrlhf.parallel.state import init_distributed
    from mrlhf.rl.make_experience import rollout
    from mrlhf.trainers.ppo import load_ppo_data

    made: list[KVCache] = []
    watched: list[weakref.ref] = []  # the K/V tensors and views of every cache

    class TrackedCache(KVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)
            watched.extend((weakref.ref(self.k), weakref.ref(self.v)))
            self.allocated, self.views = self.nbytes, 0

        def view(self, layer: int, slot: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = super().view(layer, slot, batch)
            if not any(r() is k for r in watched):  # by identity: a tensor's == is elementwise
                watched.extend((weakref.ref(k), weakref.ref(v)))
                self.views += 1
            return k, v

    cfg = load_config(TINY, ppo_overrides(out, layout, extra))
    ctx = init_distributed(cfg, "ppo")
    tokenizer, prompts, _ = load_ppo_data(cfg)
    actor = build_role(cfg, "actor", tokenizer.vocab_size, device=ctx.device)
    mine = list(range(8))
    generate.KVCache = TrackedCache  # the name Generator.generate allocates through
    try:
        exp, stats = rollout(actor, [list(prompts.train[i]) for i in mine], mine, 0, cfg, 0, tokenizer.eos_id,
                             tokenizer.pad_id, ctx.device)  # fmt: skip
    finally:
        generate.KVCache = KVCache
    gc.collect()
    res = {
        "caches": len(made),
        "allocated": [c.allocated for c in made],
        "views": [c.views for c in made],
        "stats_kv_bytes": stats["kv_cache_bytes"],
        "response_tokens": int(exp.action_mask.sum()),
        "alive_tensors": sum(r() is not None for r in watched),
        "released": [c.k is None and c.v is None and c.nbytes == 0 for c in made],
    }
    refs = [weakref.ref(c) for c in made]
    made.clear()
    gc.collect()
    res["alive_caches"] = sum(r() is not None for r in refs)  # nothing else (generator, decode state) keeps one
    return res
