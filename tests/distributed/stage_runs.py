"""Rank functions for the RM / DPO distributed tests (demo preference data, a tiny 4-layer model)."""

from __future__ import annotations

import os

import torch
from sft_runs import ROOT, TINY, rank_params

DEMO = os.path.join(ROOT, "mrlhf", "assets", "demo")


def stage_overrides(out: str, layout: dict[str, int], extra: list[str]) -> list[str]:
    return [
        "model.num_layers=4",
        f"parallel.tp={layout.get('tp', 1)}",
        f"parallel.pp={layout.get('pp', 1)}",
        f"data.train_path={DEMO}/pref_train.jsonl",
        "data.eval_path=null",
        "data.data_split=[0,3,197]",  # RM/DPO take a 1.5% share of the 20000 pairs (300) ...
        "data.eval_fraction=0.1",  # ... and hold out 30 of them: keeps the tests fast
        f"data.tokenizer_path={DEMO}/tokenizer.model",
        "data.max_seq_len=64",
        "data.max_prompt_len=48",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "training.eval_interval=0",
        "logging.progress_bar=false",
        f"training.output_dir={out}",
        *extra,
    ]


def sft_checkpoint_rank(rank: int, out: str, flavour: str) -> None:
    """A 2-step demo SFT checkpoint to start RM/DPO from."""
    from mrlhf.config import load_config
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.sft import train_sft

    extra = [f"model.flavour={flavour}", "training.train_steps=2"] + (
        ["model.num_query_groups=null"] if flavour == "gpt2" else []
    )
    over = stage_overrides(out, {}, extra)
    over = [o for o in over if not o.startswith(("data.train_path", "data.eval_path", "data.data_split", "data.eval_fraction"))]
    over += [f"data.train_path={DEMO}/sft_train.jsonl", "data.eval_path=null"]
    cfg = load_config(TINY, over)
    train_sft(cfg, init_distributed(cfg))


def stage_rank(rank: int, stage: str, out: str, layout: dict[str, int], extra: list[str]) -> dict:
    """Run `stage` (rm | dpo); return losses, final metrics, reward stats and this rank's parameters."""
    from mrlhf.config import load_config
    from mrlhf.parallel.state import init_distributed

    cfg = load_config(TINY, stage_overrides(out, layout, extra))
    ctx = init_distributed(cfg)
    if stage == "rm":
        from mrlhf.trainers.rm import train_rm as train
    else:
        from mrlhf.trainers.dpo import train_dpo as train
    result = train(cfg, ctx)
    return {"losses": result["losses"], "final": result["final"], "reward_stats": result.get("reward_stats"),
            **rank_params(result["model"])}  # fmt: skip


def scores_rank(rank: int, ckpt_dir: str, role: str, layout: dict[str, int], flavour: str) -> dict:
    """Load `role` (reward or critic) from an RM checkpoint at `layout`; score fixed demo pairs."""
    from megatron.core import parallel_state as ps

    from mrlhf import checkpoint as ckpt
    from mrlhf.config import load_config
    from mrlhf.data.collate import collate_preference
    from mrlhf.data.datasets import TokenizeOptions, load_tokenized
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.schedule import forward_only
    from mrlhf.parallel.state import init_distributed

    extra = [f"model.flavour={flavour}"] + (["model.num_query_groups=null"] if flavour == "gpt2" else [])
    cfg = load_config(TINY, stage_overrides("/tmp/unused", layout, extra))
    init_distributed(cfg)
    tok = Tokenizer.load(cfg.data.tokenizer_path)
    model = build_role(cfg, role, tok.vocab_size, seed=99)
    path = ckpt.latest_checkpoint(ckpt_dir)
    new_head = ckpt.load_model(path, role, model)
    ds = load_tokenized(f"{DEMO}/pref_eval.jsonl", "preference", tok, TokenizeOptions(max_seq_len=64, max_prompt_len=48), None)
    batch = collate_preference([ds[i] for i in range(4)], tok.pad_id)
    out = forward_only(model, [batch], lambda o, mb: o.detach(), cfg.model.hidden_size, torch.float32, torch.device("cpu"))
    if not out:
        return {"scores": None, "new_head": new_head}
    o = out[0]
    if role == "critic":  # value at the last real token of each sequence
        last = batch["attention_mask"].long().sum(-1) - 1
        o = o[torch.arange(o.shape[0]), last]
    return {"scores": o, "new_head": new_head, "tp_rank": ps.get_tensor_model_parallel_rank()}
