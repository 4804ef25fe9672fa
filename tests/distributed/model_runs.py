"""Rank functions for model-level distributed tests (logits, heads, checkpoint loading at another layout)."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from sft_runs import TINY


def make_cfg(layout: dict[str, int], extra: list[str]):
    from mrlhf.config import load_config

    return load_config(
        TINY,
        ["model.num_layers=4", f"parallel.tp={layout.get('tp', 1)}", f"parallel.pp={layout.get('pp', 1)}", *extra],
    )


def fixed_batch(vocab: int, b: int = 3, s: int = 11, seed: int = 7) -> dict[str, torch.Tensor]:
    """Right-padded batch with ragged lengths (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    lengths = torch.tensor([s, s - 3, s - 6])[:b]
    mask = torch.arange(s)[None] < lengths[:, None]
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "attention_mask": mask,
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
    }


def full_logits_on_last_stage(model, batch, cfg) -> torch.Tensor | None:
    """Run the pipeline forward; on the last stage gather the vocab-parallel logits over TP -> [b, s, v]."""
    from megatron.core import parallel_state as ps

    from mrlhf.models.backbone import backbone_forward
    from mrlhf.models.heads import vocab_parallel_logits
    from mrlhf.parallel import comm

    b, s = batch["tokens"].shape
    spec = (torch.Size((s, b, cfg.model.hidden_size)), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        inp = None if ps.is_pipeline_first_stage() else comm.recv_forward(spec)
        hidden = backbone_forward(
            model.backbone, batch["tokens"], batch["position_ids"], batch["attention_mask"], input_tensor=inp
        )
        if not ps.is_pipeline_last_stage():
            comm.send_forward(hidden)
            return None
        logits = vocab_parallel_logits(model.backbone, hidden)  # [s, b, v/tp]
        parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1).transpose(0, 1)[..., : model.backbone.real_vocab_size]


def _canonical_name(model, local: str, cfg) -> str:
    name = model.global_name(local)
    if name == "output_layer.weight" and cfg.model.tied:
        return "embedding.word_embeddings.weight"  # the tied copy on the last stage moves with the embedding
    return name


@torch.no_grad()
def perturb(model, cfg, seed: int = 3, scale: float = 0.05) -> None:
    """Add layout-invariant noise to *every* parameter (a pure function of seed and global name, sliced to this rank's
    shard), so norm weights are no longer 1 and biases no longer 0: a loader that skips them changes the logits."""
    from megatron.core import parallel_state as ps

    from mrlhf.models.backbone import _full_shape, _local_shard

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for local, param in model.named_parameters():
        name = _canonical_name(model, local, cfg)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.randn(_full_shape(param, tp), generator=gen) * scale
        param.add_(_local_shard(full, param, name, cfg.model.flavour == "llama", tp, tp_rank).to(param.dtype))


@torch.no_grad()
def reset_norms_and_biases(model, cfg) -> int:
    """Put norm weights/biases and linear biases back to their init values (1 and 0); returns how many tensors."""
    n = 0
    for local, param in model.named_parameters():
        name = _canonical_name(model, local, cfg)
        if "norm" in name or name.endswith(".bias"):
            param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            n += 1
    return n


def save_trained_then_logits(rank: int, out: str, layout: dict[str, int], flavour: str) -> dict:
    """Build at `layout`, perturb every weight deterministically (so it is not just the init), save, return logits."""
    from mrlhf import checkpoint as ckpt
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed

    extra = [f"model.flavour={flavour}"] + (["model.num_query_groups=null"] if flavour == "gpt2" else [])
    cfg = make_cfg(layout, extra)
    init_distributed(cfg)
    model = build_role(cfg, "actor", 384, seed=11)
    perturb(model, cfg)
    ckpt.save_checkpoint(out, 1, {"actor": model}, {}, {"step": 1, "consumed_samples": 0}, cfg.to_dict(), "h")
    return {"logits": full_logits_on_last_stage(model, fixed_batch(384), cfg)}


def load_then_logits(rank: int, out: str, layout: dict[str, int], flavour: str) -> dict:
    from mrlhf import checkpoint as ckpt
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed

    extra = [f"model.flavour={flavour}"] + (["model.num_query_groups=null"] if flavour == "gpt2" else [])
    cfg = make_cfg(layout, extra)
    init_distributed(cfg)
    model = build_role(cfg, "actor", 384, seed=999)  # different init: everything must come from the checkpoint
    before = full_logits_on_last_stage(model, fixed_batch(384), cfg)
    ckpt.load_model(ckpt.latest_checkpoint(out), "actor", model)
    logits = full_logits_on_last_stage(model, fixed_batch(384), cfg)
    # what a loader that dropped norms and biases would give: must differ, or the logits check could not see it
    reset_norms_and_biases(model, cfg)
    return {"logits": logits, "before": before, "norms_reset": full_logits_on_last_stage(model, fixed_batch(384), cfg)}


def heads_rank(rank: int, layout: dict[str, int], flavour: str) -> dict:
    """Outputs of every role on the fixed batch, plus the reference log-softmax computed from gathered logits."""
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.schedule import forward_only
    from mrlhf.parallel.state import init_distributed

    extra = [f"model.flavour={flavour}"] + (["model.num_query_groups=null"] if flavour == "gpt2" else [])
    cfg = make_cfg(layout, extra)
    init_distributed(cfg)
    batch = fixed_batch(384)
    out = {}
    for role in ("actor", "critic", "reward"):
        model = build_role(cfg, role, 384, seed=5)
        res = forward_only(model, [batch], lambda o, mb: o.detach(), cfg.model.hidden_size, torch.float32, torch.device("cpu"))
        out[role] = res[0] if res else None
        if role == "actor":
            out["logits"] = full_logits_on_last_stage(model, batch, cfg)
        if role == "reward" and layout == {}:
            # padding must not matter: junk after the last real token, and the same sample run alone
            junk = dict(batch, tokens=torch.where(batch["attention_mask"], batch["tokens"], 5))
            out["reward_junk_pad"] = model(junk["tokens"], junk["position_ids"], junk["attention_mask"]).detach()
            n = int(batch["attention_mask"][1].sum())
            alone = {k: v[1:2, :n] for k, v in batch.items()}
            out["reward_alone"] = model(alone["tokens"], alone["position_ids"], alone["attention_mask"]).detach()
            # left padding with positions counted over real tokens gives the same score
            from mrlhf.models.backbone import position_ids_from_mask

            left_mask = torch.flip(batch["attention_mask"], [1])
            left_tokens = torch.stack([torch.roll(t, int((~m).sum())) for t, m in zip(batch["tokens"], batch["attention_mask"])])
            left = model(left_tokens, position_ids_from_mask(left_mask), left_mask).detach()
            out["reward_left_pad"] = left
    return out
