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


def sft_rank(rank: int, out: str, layout: dict[str, int], extra: list[str]) -> dict:
    """Train; return this rank's per-step losses and its parameters (global names, local shards)."""
    from megatron.core import parallel_state as ps

    from mrlhf.config import load_config
    from mrlhf.models.backbone import global_param_name
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.sft import train_sft

    cfg = load_config(TINY, overrides(out, layout, extra))
    ctx = init_distributed(cfg)
    result = train_sft(cfg, ctx)
    model = result["model"]
    params = {
        global_param_name(model.backbone, n.removeprefix("backbone.")): p.detach().clone()
        for n, p in model.named_parameters()
    }
    coord = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
    return {"losses": result["losses"], "grad_norms": result["grad_norms"], "params": params, "coord": coord}


def set_fault(point: str | None) -> dict[str, str]:
    return {"MRLHF_FAULT": point} if point else {"MRLHF_FAULT": ""}


def assert_bitwise_equal_params(a: list[dict], b: list[dict]) -> None:
    for ra, rb in zip(a, b):
        assert ra["coord"] == rb["coord"]
        assert ra["params"].keys() == rb["params"].keys()
        for name in ra["params"]:
            assert torch.equal(ra["params"][name], rb["params"][name]), f"{name} differs on rank {ra['coord']}"
