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


def meta_build_rank(rank: int, out: str, layout: dict[str, int]) -> dict:
    """Save a perturbed actor and critic; rebuild them with from_checkpoint=True (init drawing forbidden) and load."""
    from megatron.core import parallel_state as ps
    from model_runs import fixed_batch, full_logits_on_last_stage

    import mrlhf.models.backbone as backbone
    from mrlhf import checkpoint as ckpt
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed

    cfg = make_cfg(layout, [])
    init_distributed(cfg)
    vocab = Tokenizer.load(cfg.data.tokenizer_path).vocab_size
    actor = _perturbed_actor(cfg, vocab, seed=5)
    critic = build_role(cfg, "critic", vocab, seed=6)
    ckpt.save_checkpoint(out, 1, {"actor": actor, "critic": critic}, {}, {"step": 1, "consumed_samples": 0},
                         cfg.to_dict(), "h")  # fmt: skip
    path = ckpt.latest_checkpoint(out)

    def no_draws(*a, **k):
        raise AssertionError("from_checkpoint must not draw initial values")

    import mrlhf.models.roles as roles

    originals = backbone.init_value, roles.init_value
    backbone.init_value = roles.init_value = no_draws
    try:
        a2 = build_role(cfg, "actor", vocab, from_checkpoint=True)
        c2 = build_role(cfg, "critic", vocab, from_checkpoint=True)
    finally:
        backbone.init_value, roles.init_value = originals
    assert all(p.device.type == "cpu" for p in a2.parameters())
    ckpt.load_model(path, "actor", a2)
    ckpt.load_model(path, "critic", c2)
    same = all(torch.equal(x, y) for x, y in zip(actor.state_dict().values(), a2.state_dict().values())
               if torch.is_tensor(x))  # fmt: skip
    same &= all(torch.equal(x, y) for x, y in zip(critic.state_dict().values(), c2.state_dict().values())
                if torch.is_tensor(x))  # fmt: skip
    batch = fixed_batch(vocab)
    want, got = full_logits_on_last_stage(actor, batch, cfg), full_logits_on_last_stage(a2, batch, cfg)
    return {"same_params": same, "same_logits": None if want is None else bool(torch.equal(want, got)),
            "last": ps.is_pipeline_last_stage()}  # fmt: skip
