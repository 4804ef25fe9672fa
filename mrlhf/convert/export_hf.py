"""mrlhf checkpoint (any layout) -> HF model directory that ``transformers`` loads directly.

One forked process streams the role parameter by parameter: each TP1PP1 parameter is assembled from the boxes of
the saved tensors that cover it (``streaming.ChunkReader``; any saved layout), mapped with ``hf.to_hf_state_dict``
(vocab padding stripped) and written into size-sharded safetensors planned up front (``weights.SafetensorsWriter``),
so the process holds about one parameter; then ``config.json`` and the tokenizer files. LM roles become ``*ForCausalLM`` (``GPT2LMHeadModel``); reward/critic become
``*ForSequenceClassification`` with ``num_labels=1`` and ``score.weight`` from ``head.linear.weight``. HF's score has
no bias: a zero head bias is dropped, a nonzero one is an error unless ``drop_head_bias`` (rewards then shift by a
constant, which Bradley-Terry training is blind to). An ``ema_actor`` saved next to the actor is exported to
``<out>/ema/`` with the same mapping.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch

from mrlhf.checkpoint import read_meta
from mrlhf.config import RunConfig, config_from_dict
from mrlhf.convert.hf import to_hf_state_dict
from mrlhf.convert.hf_config import SCALAR_ROLES, hf_config_for_export, spec_from_run_config
from mrlhf.convert.runtime import atomic_output, copy_tokenizer, resolve_checkpoint, run_ranks
from mrlhf.convert.streaming import ChunkReader, assemble_parameters, meta_role_model, view_of
from mrlhf.convert.weights import SafetensorsWriter, parse_size
from mrlhf.errors import ConversionError, MrlhfError
from mrlhf.models.roles import ROLES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXTRA_ROLES = {"ema_actor": "actor"}  # role directories that hold another role's model
EMA_DIR = "ema"


def role_kind(role: str) -> str:
    """The RoleModel kind a saved role directory holds."""
    if role in ROLES:
        return role
    if role in EXTRA_ROLES:
        return EXTRA_ROLES[role]
    raise ConversionError(f"unknown role '{role}' in checkpoint (known: {', '.join(ROLES + tuple(EXTRA_ROLES))})")


def checkpoint_config(meta: dict[str, Any], tp: int, pp: int) -> RunConfig:
    """The checkpoint's RunConfig at another layout."""
    data = json.loads(json.dumps(meta["config"]))
    data["parallel"] = {**data.get("parallel", {}), "tp": tp, "pp": pp}
    data["parallel"] |= {"first_stage_layers": None, "last_stage_layers": None}
    return config_from_dict(data)


def real_vocab(cfg: RunConfig, path: str) -> int:
    """Real vocabulary size: the config's, else the tokenizer's (as the trainers decide it)."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from mrlhf.data.tokenizer import Tokenizer

    try:
        return Tokenizer.load(cfg.data.tokenizer_path).vocab_size
    except MrlhfError as e:
        raise ConversionError(f"{path}: model.vocab_size is unset and the tokenizer does not load ({e})") from None


def _special_tokens(cfg: RunConfig, tok_dir: str | None) -> dict[str, int | None]:
    """bos/eos/pad ids from the checkpoint's tokenizer, when one loads (pad falls back to eos)."""
    from mrlhf.data.tokenizer import Tokenizer

    for path in (tok_dir, cfg.data.tokenizer_path):
        if path and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.model")
        if path and os.path.exists(path):
            with contextlib.suppress(MrlhfError):
                tok = Tokenizer.load(path)
                return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {}


def convert_mrlhf_to_hf(
    ckpt: str,
    out: str,
    role: str | None = None,
    max_shard_size: str = "2GB",
    dtype: str = "auto",
    drop_head_bias: bool = False,
) -> dict[str, Any]:
    """Export ``role`` (default: actor, else reward, else critic) of the checkpoint at ``ckpt`` (a save_dir or one
    step) to ``out``. Returns a summary (files written per exported model)."""
    root, path = resolve_checkpoint(ckpt)
    meta = read_meta(path)
    roles = meta.get("roles", [])
    role = role or next((r for r in ("actor", "reward", "critic", "reference") if r in roles), None)
    if role not in roles:
        raise ConversionError(f"{path}: holds roles {roles}; cannot export {role!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    cfg = checkpoint_config(meta, 1, 1)
    vocab = real_vocab(cfg, path)
    source = meta.get("converted_from") or {}
    tok_info = meta.get("tokenizer") or {}
    tok_dir = os.path.join(root, tok_info["dir"]) if tok_info.get("dir") else None
    scalar = role_kind(role) in SCALAR_ROLES
    spec = spec_from_run_config(cfg, vocab, source.get("model_type"), "score" if scalar else "lm")
    target = DTYPES.get(dtype) or cfg.to_transformer_config().params_dtype
    hf_config = hf_config_for_export(
        spec, scalar, str(target).removeprefix("torch."), source.get("config"), _special_tokens(cfg, tok_dir)
    )
    jobs = [(role, "")] + ([("ema_actor", EMA_DIR)] if role == "actor" and "ema_actor" in roles else [])
    with atomic_output(out) as tmp:
        written = run_ranks(_export_rank, 1, cfg.to_dict(), path, spec, jobs, tmp, target, max_bytes, drop_head_bias)
        for _, sub in jobs:
            dst = os.path.join(tmp, sub)
            with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
                json.dump(hf_config, f, indent=2)
            copy_tokenizer(tok_dir or cfg.data.tokenizer_path, dst)
    return {"out": os.path.abspath(out), "role": role, "architecture": hf_config["architectures"][0],
            "files": written[0], "dtype": str(target).removeprefix("torch.")}  # fmt: skip


def _export_rank(rank, cfg_dict, path, spec, jobs, out_dir, dtype, max_bytes, drop_head_bias) -> dict[str, list[str]]:
    """The single export process. For each job's role: a TP1PP1 model on the meta device names every parameter and
    the boxes of the saved tensors that make it up; the HF files are planned from the mapping of the meta tensors,
    then each parameter is read, mapped and written before the next one is read (one parameter in memory)."""
    from mrlhf.parallel.state import init_distributed

    cfg = config_from_dict(cfg_dict)
    init_distributed(cfg, "generate")  # no training batches to check
    written = {}
    for role, sub in jobs:
        kind = role_kind(role)
        scalar = kind in SCALAR_ROLES
        model = meta_role_model(cfg, kind, spec.vocab, True, True)
        role_dir = os.path.join(path, role)
        if not os.path.isdir(role_dir):
            raise ConversionError(f"{path}: holds no '{role}' model")
        reader = ChunkReader(role_dir)
        params = dict(model.named_parameters())
        names = {id(p): n for n, p in params.items()}
        pieces = assemble_parameters(model, names)
        global_names = {n: model.global_name(n) for n in params}
        plan = []  # (local name, HF keys) in model order
        entries = []
        for local, p in params.items():
            if sum(sh.data.numel() for sh in pieces.get(local, [])) != p.numel():
                raise ConversionError(f"{role_dir}: the saved tensors do not cover parameter {global_names[local]}")
            hf = to_hf_state_dict({global_names[local]: p}, spec, scalar, drop_head_bias, check_values=False)
            plan.append((local, list(hf)))
            entries += [(k, tuple(t.shape), dtype) for k, t in hf.items()]
        dst = os.path.join(out_dir, sub)
        os.makedirs(dst, exist_ok=True)
        writer = SafetensorsWriter(dst, entries, max_bytes)
        for local, keys in plan:
            meta = params[local]
            value = torch.empty(meta.shape, dtype=meta.dtype)
            for sh in pieces[local]:
                view_of(value, sh.data).copy_(reader.read_shard(sh))
            hf = to_hf_state_dict({global_names[local]: value}, spec, scalar, drop_head_bias)
            for key in keys:
                writer.write(key, hf[key].to(dtype))
            del value, hf
        written[role] = writer.close()
    return written

