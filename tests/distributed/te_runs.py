"""Rank functions of the TE-checkpoint tests: a checkpoint whose keys are Transformer Engine's (fused norms), written
on CPU by renaming a local model's sharded keys exactly as TE layers name them."""

from __future__ import annotations

import torch
from model_runs import make_cfg


def _perturbed_actor(cfg, vocab: int, seed: int):
    from mrlhf.models.roles import build_role

    model = build_role(cfg, "actor", vocab, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter moves, norms included, so a norm that fails to load is visible
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def save_te_named(rank: int, out: str) -> dict:
    from mrlhf import checkpoint as ckpt
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.models.keymap import rename_sharded_keys
    from mrlhf.parallel.state import init_distributed

    cfg = make_cfg({}, [])
    init_distributed(cfg)
    tok = Tokenizer.load(cfg.data.tokenizer_path)
    model = _perturbed_actor(cfg, tok.vocab_size, seed=11)
    own = model.sharded_state_dict
    model.backbone.transformer_impl = "te"
    model.sharded_state_dict = lambda prefix="": rename_sharded_keys(own(prefix), src="te", dst="local")
    ckpt.save_checkpoint(out, 1, {"actor": model}, {}, {"step": 1, "consumed_samples": 0}, cfg.to_dict(), tok.hash)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load_into_local(rank: int, out: str, layout: dict[str, int]) -> dict:
    from megatron.core import parallel_state as ps

    from mrlhf import checkpoint as ckpt
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.parallel.state import init_distributed

    cfg = make_cfg(layout, [])
    init_distributed(cfg)
    tok = Tokenizer.load(cfg.data.tokenizer_path)
    model = _perturbed_actor(cfg, tok.vocab_size, seed=99)  # other values: only the load can make them equal
    path = ckpt.latest_checkpoint(out)
    ckpt.load_model(path, "actor", model)
    params = {}
    for n, p in model.named_parameters():
        params[model.global_name(n)] = (p.detach().clone(), bool(getattr(p, "tensor_model_parallel", False)),
                                        getattr(p, "partition_dim", 0))  # fmt: skip
    return {"params": params, "tp_rank": ps.get_tensor_model_parallel_rank(), "tp": layout.get("tp", 1),
            "meta_impl": ckpt.read_meta(path)["transformer_impl"]}  # fmt: skip
