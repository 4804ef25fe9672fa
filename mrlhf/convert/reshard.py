"""Offline TP/PP resharding of an mrlhf checkpoint, and a read-only inspector.

Resharding forks the *target* layout's ranks; each builds its stage of every saved role on the meta device and
saves it at the new layout, each shard read from the source as the box of the global tensor it covers when the
writer asks for it (``streaming``: one shard in memory at a time, bit-exact copies). Only model weights move:
optimizer state is per rank and tied to the layout it was saved at (ZeRO shards, TP-sharded moments), so it is
not carried -- a resharded checkpoint starts a new run (``checkpoint.load_dir``), it does not resume one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf.checkpoint import read_meta, save_checkpoint
from mrlhf.config import config_from_dict
from mrlhf.convert.export_hf import checkpoint_config, real_vocab, role_kind
from mrlhf.convert.runtime import TOKENIZER_DIR, atomic_output, patch_meta, resolve_checkpoint, run_ranks
from mrlhf.convert.streaming import ChunkReader, LazySaveStrategy, meta_role_model
from mrlhf.errors import ConfigError, ConversionError


def reshard_checkpoint(ckpt: str, out: str, tp: int, pp: int) -> dict[str, Any]:
    """Write the model weights of every role of ``ckpt`` (any layout) as a new checkpoint at tp x pp in ``out``."""
    root, path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    try:
        cfg = checkpoint_config(meta, tp, pp)
    except ConfigError as e:
        raise ConversionError(f"{path}: cannot reshard to tp={tp} pp={pp}: {e}") from None
    vocab = real_vocab(cfg, path)
    for role in meta["roles"]:
        role_kind(role)
    out = os.path.abspath(out)
    with atomic_output(out) as tmp:
        tok = meta.get("tokenizer") or {}
        extra: dict[str, Any] = {"resharded_from": {"path": path, "layout": meta.get("layout")}}
        if tok.get("dir") and os.path.isdir(os.path.join(root, tok["dir"])):
            shutil.copytree(os.path.join(root, tok["dir"]), os.path.join(tmp, TOKENIZER_DIR))
            extra["tokenizer"] = tok | {"dir": TOKENIZER_DIR}
            old = os.path.join(root, tok["dir"])
            if cfg.data.tokenizer_path.startswith(old):  # point the run config at the copy
                cfg.data.tokenizer_path = os.path.join(out, TOKENIZER_DIR) + cfg.data.tokenizer_path[len(old) :]
        if "converted_from" in meta:
            extra["converted_from"] = meta["converted_from"]
        (step_dir, *_) = run_ranks(_reshard_rank, tp * pp, cfg.to_dict(), path, meta, vocab, tmp)
        patch_meta(step_dir, extra)
    return {"out": out, "roles": meta["roles"], "from": meta.get("layout"), "to": {"tp": tp, "pp": pp}}


def _reshard_rank(rank: int, cfg_dict: dict, path: str, meta: dict, vocab: int, save_dir: str) -> str:
    """One target rank: every role's stage on the meta device; at save time each shard is read as the box of the
    saved global tensor it covers (``streaming.ChunkReader``), one at a time."""
    from mrlhf.parallel.state import init_distributed

    cfg = config_from_dict(cfg_dict)
    init_distributed(cfg, "generate")  # no training batches to check
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    models, strategies = {}, {}
    for role in meta["roles"]:
        models[role] = meta_role_model(cfg, role_kind(role), vocab, first, last)
        strategies[role] = LazySaveStrategy(ChunkReader(os.path.join(path, role)).read_shard)
    train_state = meta.get("train_state") or {"step": meta["step"], "consumed_samples": 0, "extra": {}}
    return save_checkpoint(
        save_dir, meta["step"], models, {}, train_state, cfg.to_dict(), meta.get("tokenizer_hash", ""),
        sharded_strategy=strategies,
    )  # fmt: skip


def inspect_checkpoint(ckpt: str) -> str:
    """A readable report: step, layout, roles, tokenizer, origin, model config and every tensor's global shape and
    dtype, read from dist_checkpointing metadata (no model is built, no process group is needed). Every file of the
    integrity manifest is verified first (``integrity.set_verify(False)``: sizes only)."""
    from megatron.core import dist_checkpointing

    from mrlhf import integrity

    root, path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    files = integrity.manifest(path)
    if files is None:
        checked = "no manifest (saved before mrlhf wrote hashes): nothing to verify"
    else:  # every file the save wrote, hashed in parallel; the first mismatch is a one-line CheckpointError
        integrity.verify_files([os.path.join(path, rel) for rel in sorted(files)])
        size = sum(e["size"] for e in files.values())
        how = "sha256 verified" if integrity.verifying() else "sizes only (verification off)"
        checked = f"{len(files)} files, {size / 2**20:.1f} MiB: {how}"
    layout = meta.get("layout", {})
    tok = meta.get("tokenizer") or {}
    lines = [
        f"checkpoint   {path}",
        f"step         {meta.get('step')}   saved {meta.get('saved_at', '?')}",
        f"layout       tp={layout.get('tp')} pp={layout.get('pp')} dp={layout.get('dp')}",
        f"roles        {', '.join(meta.get('roles', []))}",
        f"integrity    {checked}",
        f"tokenizer    hash {meta.get('tokenizer_hash') or '-'}"
        + (f"   files {os.path.join(root, tok['dir'])}: {', '.join(tok.get('files', []))}" if tok.get("dir") else ""),
    ]
    if meta.get("converted_from"):
        src = meta["converted_from"]
        lines.append(f"converted    from {src.get('architecture')} at {src.get('path')} ({src.get('dtype')})")
    if meta.get("resharded_from"):
        lines.append(f"resharded    from layout {meta['resharded_from'].get('layout')}")
    model = meta.get("config", {}).get("model", {})
    lines.append("model        " + ", ".join(f"{k}={v}" for k, v in model.items()))
    precision = meta.get("config", {}).get("training", {}).get("precision")
    lines.append(f"precision    {precision}")
    for role in meta.get("roles", []):
        tensors = dist_checkpointing.load_tensors_metadata(os.path.join(path, role))
        total = 0
        lines.append(f"[{role}]")
        for key in sorted(tensors):
            t = tensors[key]
            shape = tuple(getattr(t, "global_shape", ()))
            numel = int(torch.Size(shape).numel()) if shape else 0
            total += numel
            dtype = str(getattr(t, "dtype", "?")).removeprefix("torch.")
            lines.append(f"  {key:<70} {str(list(shape)):<20} {dtype}")
        lines.append(f"  {total:,} parameters (vocabulary padding included)")
    return "\n".join(lines)
