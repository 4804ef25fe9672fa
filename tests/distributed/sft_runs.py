"""Rank functions shared by the distributed SFT tests (module-level so forked children can run them)."""

from __future__ import annotations

import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")

# 4 layers so PP2 holds 2 per stage; small batches so 5 steps take well under a second per layout.
BASE = [
    "model.num_layers=4",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.eval_interval=0",
    "logging.progress_bar=false",
    "scheduler.warmup_steps=2",
]


def overrides(out: str, layout: dict[str, int], extra: list[str]) -> list[str]:
    return BASE + [
        f"parallel.tp={layout.get('tp', 1)}",
        f"parallel.pp={layout.get('pp', 1)}",
        f"training.output_dir={out}",
        *extra,
    ]


def rank_params(model) -> dict:
    """This rank's parameters (global names, local shards), how each is TP-split, its coordinates and the TP size
    (``gated``: SwiGLU fc1, whose TP shard is [gate_r; up_r])."""
    from megatron.core import parallel_state as ps

    from mrlhf.models.backbone import global_param_name

    params, split = {}, {}
    for n, p in model.named_parameters():
        name = global_param_name(model.backbone, n.removeprefix("backbone."))
        params[name] = p.detach().clone()
        split[name] = (bool(getattr(p, "tensor_model_parallel", False)), getattr(p, "partition_dim", 0))
    coord = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
    tp = ps.get_tensor_model_parallel_world_size()
    return {"params": params, "split": split, "coord": coord, "tp": tp, "gated": model.cfg.model.flavour == "llama"}


def sft_rank(rank: int, out: str, layout: dict[str, int], extra: list[str]) -> dict:
    """Train; return this rank's per-step losses and its parameters (global names, local shards)."""
    from mrlhf.config import load_config
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.sft import train_sft

    cfg = load_config(TINY, overrides(out, layout, extra))
    ctx = init_distributed(cfg)
    result = train_sft(cfg, ctx)
    return {"losses": result["losses"], "grad_norms": result["grad_norms"], **rank_params(result["model"])}


def shard(full: torch.Tensor, tp_split: bool, dim: int, name: str, tp: int, tp_rank: int, gated: bool) -> torch.Tensor:
    """The TP rank's slice of a TP1 tensor (SwiGLU fc1 keeps [gate_r; up_r] per rank)."""
    if not tp_split or tp == 1:
        return full
    if gated and "linear_fc1" in name:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


def assert_params_match(results: list[dict], ref: dict, rel_tol: float = 1e-5) -> float:
    """Every rank's final local shard equals the TP1 run's slice, per tensor max|got - want| <= rel_tol * max|want|,
    and the ranks together hold every reference tensor; returns the worst relative difference seen."""
    worst, seen = 0.0, set()
    for r in results:
        for name, got in r["params"].items():
            key = name
            if name == "output_layer.weight" and name not in ref["params"]:
                key = "embedding.word_embeddings.weight"  # tied: the last stage's copy of the PP1 run's one tensor
            assert key in ref["params"], (name, r["coord"])
            want = shard(ref["params"][key], *r["split"][name], name, r["tp"], r["coord"][0], r["gated"])
            assert got.shape == want.shape, (name, r["coord"], got.shape, want.shape)
            d = rel_diff(got.float(), want.float())
            assert d <= rel_tol, (name, r["coord"], d)
            worst = max(worst, d)
            seen.add(key)
    assert seen == set(ref["params"]), sorted(set(ref["params"]) - seen)
    return worst


def assert_losses_match(got: list[float], want: list[float], rel_tol: float = 1e-5, what: str = "") -> None:
    """Same number of steps, each loss within rel_tol of the reference."""
    assert len(got) == len(want) and want, (what, len(got), len(want))
    for g, w in zip(got, want):
        assert abs(g - w) <= rel_tol * abs(w), (what, got, want)


def set_fault(point: str | None) -> dict[str, str]:
    return {"MRLHF_FAULT": point} if point else {"MRLHF_FAULT": ""}


def assert_bitwise_equal_params(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a, (len(a), len(b))
    for ra, rb in zip(a, b):
        assert ra["coord"] == rb["coord"]
        assert ra["params"].keys() == rb["params"].keys()
        for name in ra["params"]:
            assert torch.equal(ra["params"][name], rb["params"][name]), f"{name} differs on rank {ra['coord']}"
