"""Checkpoints: atomic save, load at any TP/PP layout, bit-exact resume.

Layout of ``save_dir``::

    latest                      name of the newest complete checkpoint (written last, atomically)
    step_00000010/
      meta.json                 step, consumed samples, layout, roles, tokenizer hash, resolved config
      <role>/                   megatron-core dist_checkpointing (torch_dist) of that role's model
      ranks/tp{t}_pp{p}_dp{d}.pt  per-rank RNG states and optimizer state (ZeRO shard or dp 0's copy)

A save writes everything into ``step_N.tmp``, renames it to ``step_N`` and only then rewrites ``latest``; a save
killed at any point leaves the previous checkpoint complete and chosen. Model weights go through
dist_checkpointing, so they reshard on load (saved at TP2xPP2, loaded at TP1). Optimizer and RNG states are
per rank and need the same layout (exact resume).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps

from mrlhf.errors import CheckpointError
from mrlhf.parallel import comm
from mrlhf.testing_faults import maybe_fault

LATEST = "latest"
META = "meta.json"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(root: str, dp_rank: int | None = None) -> str:
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp = ps.get_data_parallel_rank() if dp_rank is None else dp_rank
    return os.path.join(root, "ranks", f"tp{tp}_pp{pp}_dp{dp}.pt")


def layout_dict() -> dict[str, int]:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(save_dir: str) -> str | None:
    """Directory of the newest complete checkpoint in ``save_dir``, or None."""
    tracker = os.path.join(save_dir, LATEST)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    if not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"{tracker} names '{name}' but {path}/{META} is missing (checkpoint incomplete)")
    return path


def read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"not a complete mrlhf checkpoint: {meta_path} is missing")
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def save_checkpoint(
    save_dir: str,
    step: int,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, Any],
    train_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_hash: str,
    keep_last: int = 0,
    sharded_strategy: Any = None,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``sharded_strategy`` (one, or one
    per role) replaces megatron's default writer (conversions stream through ``convert.streaming.LazySaveStrategy``)."""
    from megatron.core import dist_checkpointing

    name = _step_name(step)
    final = os.path.join(save_dir, name)
    tmp = final + ".tmp"
    if torch.distributed.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        for entry in os.listdir(save_dir):  # leftovers of saves that were killed
            if entry.endswith(".tmp") and os.path.isdir(os.path.join(save_dir, entry)):
                shutil.rmtree(os.path.join(save_dir, entry))
        os.makedirs(os.path.join(tmp, "ranks"))
        for role in models:
            os.makedirs(os.path.join(tmp, role))
    comm.barrier()
    for role, model in models.items():
        strategy = sharded_strategy.get(role) if isinstance(sharded_strategy, dict) else sharded_strategy
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, role), sharded_strategy=strategy)
    maybe_fault("save_after_model")
    per_rank: dict[str, Any] = {"rng": rng_state()}
    for role, opt in optimizers.items():
        if opt.zero1 or ps.get_data_parallel_rank() == 0:
            per_rank[f"optimizer.{role}"] = opt.state_dict()
    torch.save(per_rank, _rank_file(tmp))
    comm.barrier()
    if torch.distributed.get_rank() == 0:
        meta = {
            "format": 1,
            "step": step,
            "train_state": train_state,
            "roles": sorted(models),
            "layout": layout_dict(),
            "zero1": {role: bool(opt.zero1) for role, opt in optimizers.items()},
            "tokenizer_hash": tokenizer_hash,
            "config": config,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_text_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1, default=str))
        if os.path.isdir(final):  # re-saving the same step: move the old one out of the way first
            shutil.rmtree(final)
        os.rename(tmp, final)
        maybe_fault("save_before_latest")
        _write_text_atomic(os.path.join(save_dir, LATEST), name)
        _apply_retention(save_dir, keep_last, keep=name)
    comm.barrier()
    return final


def _apply_retention(save_dir: str, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted(e for e in os.listdir(save_dir) if e.startswith("step_") and not e.endswith(".tmp"))
    for old in steps[:-keep_last]:
        if old != keep:
            shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


# Which saved role can initialise which: an LM role from an LM role; a scalar role from a scalar role (head kept) or
# from an LM role (backbone only, new head).
SOURCES = {
    "actor": ("actor", "reference"),
    "reference": ("reference", "actor"),
    "reward": ("reward", "critic", "actor"),
    "critic": ("critic", "reward", "actor"),
}


def pick_source_role(path: str, role: str) -> str:
    roles = read_meta(path).get("roles", [])
    for candidate in SOURCES[role]:
        if candidate in roles:
            return candidate
    raise CheckpointError(f"checkpoint {path} holds {roles}; none can initialise a '{role}' model")


def load_model(path: str, role: str, model: torch.nn.Module, source_role: str | None = None) -> bool:
    """Load ``role``'s weights from ``source_role`` (default: best match) of a checkpoint saved at any TP/PP layout.

    Collective. Returns True when the head had no source (an LM checkpoint initialising a reward/critic model) and
    keeps its fresh initialisation; any other missing or unexpected key is an error that lists the keys.
    """
    from megatron.core import dist_checkpointing

    source_role = source_role or pick_source_role(path, role)
    role_dir = os.path.join(path, source_role)
    if not os.path.isdir(role_dir):
        raise CheckpointError(f"checkpoint {path} holds no '{source_role}' model (has: {read_meta(path).get('roles')})")
    sharded = model.sharded_state_dict()
    new_head = source_role in ("actor", "reference") and getattr(model, "head", None) is not None
    if new_head:
        sharded = {k: v for k, v in sharded.items() if not k.startswith("head.")}
    try:
        state = dist_checkpointing.load(sharded, role_dir)
    except Exception as e:  # megatron raises several types for key/shape mismatches
        raise CheckpointError(f"cannot load '{role}' from {role_dir}: {str(e).splitlines()[0]}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and not (new_head and k.startswith("head."))]
    if missing or unexpected:
        raise CheckpointError(f"'{role}' from {role_dir}: missing keys {missing}, unexpected keys {unexpected}")
    return new_head


def load_checkpoint(
    path: str,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, Any],
    tokenizer_hash: str | None,
) -> dict[str, Any]:
    """Resume: weights, optimizer states and RNG of this rank. Returns the checkpoint's meta (train_state...)."""
    meta = read_meta(path)
    if tokenizer_hash is not None and meta.get("tokenizer_hash") != tokenizer_hash:
        raise CheckpointError(
            f"{path}: tokenizer hash {meta.get('tokenizer_hash')} differs from this run's tokenizer ({tokenizer_hash})"
        )
    saved, now = meta["layout"], layout_dict()
    if optimizers and saved != now:
        raise CheckpointError(
            f"{path} was saved at tp={saved['tp']} pp={saved['pp']} dp={saved['dp']}; exact resume needs the same "
            f"layout (this run: tp={now['tp']} pp={now['pp']} dp={now['dp']}). To start a new run from its weights "
            f"at this layout use checkpoint.load_dir={path} checkpoint.resume=false"
        )
    for role, model in models.items():
        load_model(path, role, model, source_role=role)
    per_rank = _safe_load(_rank_file(path))
    for role, opt in optimizers.items():
        # without ZeRO only dp rank 0 stored the (replicated) optimizer state: every dp rank reads that copy
        source = per_rank if opt.zero1 else _safe_load(_rank_file(path, dp_rank=0))
        key = f"optimizer.{role}"
        if key not in source:
            raise CheckpointError(f"{path}: no optimizer state for '{role}' (saved with checkpoint.save_optimizer=false?)")
        opt.load_state_dict(source[key])
    set_rng_state(per_rank["rng"])
    return meta


def _safe_load(path: str) -> dict[str, Any]:
    """torch.load restricted to tensors, containers and the numpy types RNG states need (no arbitrary pickles)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"per-rank checkpoint state {path} is missing")
    safe = [np.ndarray, np.dtype, type(np.dtype("uint32")), np.core.multiarray._reconstruct]
    with torch.serialization.safe_globals(safe):
        return torch.load(path, weights_only=True)
