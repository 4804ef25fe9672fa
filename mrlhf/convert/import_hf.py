"""HF model directory -> mrlhf checkpoint at any TP x PP layout.

Everything that can be checked from config.json and the weight-file headers is checked first, in the calling
process: architecture and fields, divisibility by the target layout, missing/extra tensors and their shapes. Then
``tp * pp`` ranks are forked; each builds its stage of the RoleModel and fills every parameter with its TP shard,
reading only those slices of the HF tensors (``hf.local_shard``), and all save through ``save_checkpoint`` -- the
format the trainers write. The stage is built on the meta device and each parameter is read when the writer asks
for it (``streaming.LazySaveStrategy``), so a rank holds about one parameter, not its stage. The output appears
all at once (``runtime.atomic_output``) or not at all.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf.checkpoint import save_checkpoint
from mrlhf.config import config_from_dict
from mrlhf.convert.hf import hf_tensor_shapes, ignorable, local_shard, recipes
from mrlhf.convert.hf_config import SCALAR_ROLES, HFSpec, read_hf_config, run_config_for
from mrlhf.convert.runtime import (
    TOKENIZER_DIR,
    atomic_output,
    copy_tokenizer,
    patch_meta,
    run_ranks,
    tokenizer_entry,
)
from mrlhf.convert.streaming import LazySaveStrategy, base_of, meta_role_model, view_of
from mrlhf.convert.weights import WeightReader
from mrlhf.errors import ConversionError

DEFAULT_ROLE = {"lm": "actor", "score": "reward", "v_head": "critic"}


def inspect_hf(hf_dir: str) -> tuple[HFSpec, WeightReader]:
    """Config and weight index of a HF directory, with the key conventions read off the tensor names."""
    spec = read_hf_config(hf_dir)
    reader = WeightReader.open(hf_dir)
    if spec.model_type == "gpt2" and "transformer.wte.weight" not in reader and "wte.weight" in reader:
        spec = dataclasses.replace(spec, prefix="")  # a bare GPT2Model file (e.g. the original gpt2 upload)
    if spec.head == "lm" and any(k.startswith("v_head.") for k in reader.files):
        key = "v_head.summary" if "v_head.summary.weight" in reader else "v_head"
        spec = dataclasses.replace(spec, head="v_head", v_head_key=key)
    return spec, reader


def check_tensors(spec: HFSpec, reader: WeightReader, role: str) -> None:
    """Every tensor the config implies is present with its shape, and nothing unexplained is left over."""
    scalar = role in SCALAR_ROLES
    if scalar and spec.head == "lm":
        raise ConversionError(
            f"{spec.source}: {spec.raw['architectures'][0]} has no reward/value head (score.weight or v_head.*); "
            f"convert it as --role actor, then train a reward model from it (checkpoint.load_dir adds a new head)"
        )
    if not scalar and spec.head == "score":
        raise ConversionError(
            f"{spec.source}: a *ForSequenceClassification model has no LM head; use --role reward|critic"
        )
    expected = hf_tensor_shapes(recipes(spec, scalar))
    where = reader.source
    missing = [k for k, (_, optional) in expected.items() if k not in reader and not optional]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConversionError(f"{where}: missing tensor(s) that {spec.source} implies: {', '.join(missing[:3])}{more}")
    extra = [k for k in reader.files if k not in expected and not ignorable(k, spec, scalar)]
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ConversionError(
            f"{reader.files[extra[0]]}: unexpected tensor(s) {', '.join(extra[:3])}{more}: not part of a "
            f"{spec.raw.get('architectures', ['?'])[0]} as {spec.source} describes it"
        )
    for key, (shape, _) in expected.items():
        if key in reader:
            if reader.shapes[key] != shape:
                raise ConversionError(
                    f"{reader.files[key]}: tensor {key} has shape {list(reader.shapes[key])}, "
                    f"but {spec.source} implies {list(shape)}"
                )
            if not reader.dtypes[key].is_floating_point:
                raise ConversionError(f"{reader.files[key]}: tensor {key} has non-float dtype {reader.dtypes[key]}")


def convert_hf_to_mrlhf(
    hf_dir: str, out: str, tp: int = 1, pp: int = 1, role: str | None = None, dtype: str = "auto"
) -> dict[str, Any]:
    """Write an mrlhf checkpoint (``out/latest``, ``out/step_00000000/``, ``out/tokenizer/``) of the HF model in
    ``hf_dir`` at layout tp x pp. Returns a summary (role, layout, precision, tokenizer hash, output path)."""
    spec, reader = inspect_hf(hf_dir)
    role = role or DEFAULT_ROLE[spec.head]
    check_tensors(spec, reader, role)
    if dtype not in ("auto", "fp32", "bf16"):
        raise ConversionError(f"--dtype {dtype!r}: expected auto, fp32 or bf16")
    precision = dtype if dtype != "auto" else ("bf16" if reader.dominant_dtype() == torch.bfloat16 else "fp32")
    run_config_for(spec, tp, pp, precision)  # layout errors before anything is written
    out = os.path.abspath(out)
    with atomic_output(out) as tmp:
        files = copy_tokenizer(hf_dir, os.path.join(tmp, TOKENIZER_DIR))
        tok_path, tok_hash = tokenizer_entry(os.path.join(tmp, TOKENIZER_DIR), files, os.path.join(out, TOKENIZER_DIR))
        cfg = run_config_for(spec, tp, pp, precision, tok_path)
        (step_dir, *_) = run_ranks(_convert_rank, tp * pp, cfg.to_dict(), spec, reader, role, tmp, tok_hash)
        patch_meta(
            step_dir,
            {
                "converted_from": {
                    "path": os.path.abspath(hf_dir),
                    "architecture": spec.raw["architectures"][0],
                    "model_type": spec.model_type,
                    "head": spec.head,
                    "dtype": str(reader.dominant_dtype()).removeprefix("torch."),
                    "config": spec.raw,
                },
                "tokenizer": {"dir": TOKENIZER_DIR if files else None, "files": files, "hash": tok_hash},
            },
        )
    return {"out": out, "role": role, "tp": tp, "pp": pp, "precision": precision, "tokenizer_files": files,
            "tokenizer_hash": tok_hash, "architecture": spec.raw["architectures"][0],
            "notes": list(spec.notes)}  # fmt: skip


def _convert_rank(
    rank: int, cfg_dict: dict, spec: HFSpec, reader: WeightReader, role: str, save_dir: str, tok_hash: str
):
    """One rank: build this stage on the meta device, then save collectively while each parameter's TP shard is
    read from the HF files only when the writer asks for it (one parameter in memory at a time). Returns the step
    directory."""
    from mrlhf.parallel.state import init_distributed

    cfg = config_from_dict(cfg_dict)
    init_distributed(cfg, "generate")  # no training batches to check
    model = meta_role_model(cfg, role, spec.vocab, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    dtype = cfg.to_transformer_config().params_dtype
    table = recipes(spec, role in SCALAR_ROLES)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padded = cfg.model.padded_vocab_size(spec.vocab)
    names: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for local, param in model.named_parameters():
        name = model.global_name(local)
        if name not in table:
            raise ConversionError(f"no HF source for mrlhf parameter {name} ({spec.model_type}, role {role})")
        names[id(param)] = (name, param)
    last: dict[str, Any] = {}  # the parameter read most recently (SwiGLU's fc1 is saved as two halves)

    def produce(sh) -> torch.Tensor:
        name, param = names[id(base_of(sh.data))]
        if last.get("name") != name:
            last.clear()
            value = local_shard(table[name], spec, reader, tp, tp_rank, padded)
            if value.shape != param.shape:
                raise ConversionError(
                    f"{name}: built a shard of shape {list(value.shape)}, expected {list(param.shape)}"
                )
            last.update(name=name, value=value.to(dtype).contiguous())
        return view_of(last["value"], sh.data)

    train_state = {"step": 0, "consumed_samples": 0, "extra": {}}
    return save_checkpoint(
        save_dir, 0, {role: model}, {}, train_state, cfg.to_dict(), tok_hash, sharded_strategy=LazySaveStrategy(produce)
    )
