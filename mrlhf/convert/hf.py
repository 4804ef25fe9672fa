"""Weight mapping between mrlhf (megatron-core GPTModel) and HF transformers: one table, used both ways.

:func:`recipes` says, for every *global* megatron parameter name, which HF tensors it is made of and how:

- ``copy``: the HF tensor itself (transposed for GPT-2's Conv1D, which stores ``[in, out]``);
- ``qkv``: megatron's fused QKV, whose rows are grouped per query group -- ``[q heads of group g, k_g, v_g]`` --
  from HF's separate q/k/v projections (or the q/k/v column blocks of GPT-2's ``c_attn``);
- ``gated``: SwiGLU's fc1 ``[gate; up]`` (each TP rank holds ``[gate_r; up_r]``, see ``backbone._local_shard``);
- ``vocab``: embedding / LM head rows, padded with zeros to the padded vocabulary.

Import (HF -> mrlhf) runs :func:`local_shard` on every rank: it reads only the rows/columns of the HF tensors that
this TP rank holds. Export (mrlhf -> HF) runs :func:`to_hf_state_dict` on the full (TP1PP1) state dict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

from mrlhf.convert.hf_config import HFSpec, hf_config_for_export, spec_from_run_config
from mrlhf.errors import ConversionError


class Reader(Protocol):
    """Where import reads HF tensors from (``weights.WeightReader``)."""

    def __contains__(self, key: str) -> bool: ...

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor, or its [start, stop) slice along ``dim``."""
        ...


@dataclass(frozen=True)
class Piece:
    """One HF tensor (or a block of one) that a megatron parameter is made of."""

    key: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    """HF stores it [in, out] (GPT-2 Conv1D): the megatron weight is its transpose."""
    offset: int = 0
    """Start of this block along HF's output dim (q/k/v inside GPT-2's c_attn)."""
    size: int | None = None
    """Length of the block along HF's output dim (None: all of it)."""
    optional: bool = False
    """May be absent (a score head without bias): import reads zeros; export writes nothing and needs zeros."""


@dataclass(frozen=True)
class Recipe:
    kind: str
    """'copy', 'qkv', 'gated' or 'vocab'."""
    pieces: tuple[Piece, ...]
    split: int | None = None
    """Megatron's TP partition dim of the parameter; None: replicated over TP."""


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Global-name -> tensor of a TP1PP1 RoleModel's backbone (and head)."""
    from megatron.core import parallel_state as ps

    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    return {model.global_name(name): p.detach() for name, p in model.named_parameters()}


def split_qkv(
    w: torch.Tensor, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused QKV ([groups * (heads/groups + 2) * head_dim, ...]) -> q, k, v in HF row order."""
    per = heads // groups
    w = w.reshape(groups, per + 2, head_dim, *w.shape[1:])
    q = w[:, :per].reshape(heads * head_dim, *w.shape[3:])
    k = w[:, per].reshape(groups * head_dim, *w.shape[3:])
    v = w[:, per + 1].reshape(groups * head_dim, *w.shape[3:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    per = heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per, head_dim, *rest)
    k = k.reshape(groups, 1, head_dim, *rest)
    v = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * head_dim, *rest)


# ----------------------------------------------------------------------------------------------------------------------
# The table


def recipes(spec: HFSpec, scalar: bool) -> dict[str, Recipe]:
    """Global megatron name -> Recipe for every parameter of an LM role (``scalar=False``) or a reward/critic."""
    h, heads, groups, hd, ffn, v = spec.hidden, spec.heads, spec.groups, spec.head_dim, spec.ffn, spec.vocab
    p = spec.prefix
    out: dict[str, Recipe] = {}

    def copy(name: str, key: str, shape: tuple[int, ...], split: int | None = None, transpose: bool = False) -> None:
        out[name] = Recipe("copy", (Piece(key, shape, transpose),), split)

    gpt2 = spec.model_type == "gpt2"
    embed = f"{p}wte.weight" if gpt2 else f"{p}embed_tokens.weight"
    out["embedding.word_embeddings.weight"] = Recipe("vocab", (Piece(embed, (v, h)),), 0)
    norms = ("weight", "bias") if gpt2 else ("weight",)
    for leaf in norms:
        copy(f"decoder.final_layernorm.{leaf}", f"{p}{'ln_f' if gpt2 else 'norm'}.{leaf}", (h,))
    if gpt2:
        copy("embedding.position_embeddings.weight", f"{p}wpe.weight", (spec.max_positions, h))
    for i in range(spec.num_layers):
        src, dst = f"decoder.layers.{i}.", f"{p}h.{i}." if gpt2 else f"{p}layers.{i}."
        if gpt2:
            for leaf in norms:
                copy(f"{src}input_layernorm.{leaf}", f"{dst}ln_1.{leaf}", (h,))
                copy(f"{src}pre_mlp_layernorm.{leaf}", f"{dst}ln_2.{leaf}", (h,))
            w, b = f"{dst}attn.c_attn.weight", f"{dst}attn.c_attn.bias"
            out[f"{src}self_attention.linear_qkv.weight"] = Recipe(
                "qkv", tuple(Piece(w, (h, 3 * h), True, j * h, h) for j in range(3)), 0
            )
            out[f"{src}self_attention.linear_qkv.bias"] = Recipe(
                "qkv", tuple(Piece(b, (3 * h,), False, j * h, h) for j in range(3)), 0
            )
            copy(f"{src}self_attention.linear_proj.weight", f"{dst}attn.c_proj.weight", (h, h), 1, True)
            copy(f"{src}self_attention.linear_proj.bias", f"{dst}attn.c_proj.bias", (h,))
            copy(f"{src}mlp.linear_fc1.weight", f"{dst}mlp.c_fc.weight", (h, ffn), 0, True)
            copy(f"{src}mlp.linear_fc1.bias", f"{dst}mlp.c_fc.bias", (ffn,), 0)
            copy(f"{src}mlp.linear_fc2.weight", f"{dst}mlp.c_proj.weight", (ffn, h), 1, True)
            copy(f"{src}mlp.linear_fc2.bias", f"{dst}mlp.c_proj.bias", (h,))
            continue
        copy(f"{src}input_layernorm.weight", f"{dst}input_layernorm.weight", (h,))
        copy(f"{src}pre_mlp_layernorm.weight", f"{dst}post_attention_layernorm.weight", (h,))
        leaves = ("weight", "bias") if spec.qkv_bias else ("weight",)
        for leaf in leaves:
            rest = (h,) if leaf == "weight" else ()
            out[f"{src}self_attention.linear_qkv.{leaf}"] = Recipe(
                "qkv",
                (
                    Piece(f"{dst}self_attn.q_proj.{leaf}", (heads * hd, *rest)),
                    Piece(f"{dst}self_attn.k_proj.{leaf}", (groups * hd, *rest)),
                    Piece(f"{dst}self_attn.v_proj.{leaf}", (groups * hd, *rest)),
                ),
                0,
            )
        copy(f"{src}self_attention.linear_proj.weight", f"{dst}self_attn.o_proj.weight", (h, heads * hd), 1)
        gate, up = Piece(f"{dst}mlp.gate_proj.weight", (ffn, h)), Piece(f"{dst}mlp.up_proj.weight", (ffn, h))
        out[f"{src}mlp.linear_fc1.weight"] = Recipe("gated", (gate, up), 0)
        copy(f"{src}mlp.linear_fc2.weight", f"{dst}mlp.down_proj.weight", (h, ffn), 1)
    if not scalar:
        lm = embed if spec.tied else "lm_head.weight"  # tied: the last stage's copy of the embedding (PP > 1)
        out["output_layer.weight"] = Recipe("vocab", (Piece(lm, (v, h)),), 0)
    else:
        module = {"score": "score", "v_head": spec.v_head_key}[spec.head]
        copy("head.linear.weight", f"{module}.weight", (1, h))
        out["head.linear.bias"] = Recipe("copy", (Piece(f"{module}.bias", (1,), optional=True),))
    return out


def hf_tensor_shapes(table: dict[str, Recipe]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """HF key -> (full shape, optional) over every recipe of the table."""
    return {piece.key: (piece.hf_shape, piece.optional) for recipe in table.values() for piece in recipe.pieces}


_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def ignorable(key: str, spec: HFSpec, scalar: bool) -> bool:
    """HF keys that a conversion may leave out: causal-mask/RoPE buffers, a tied duplicate of the embedding, the LM
    head of a model converted to a scalar role, a TRL value head of one converted to an LM role."""
    if _BUFFERS.search(key):
        return True
    if key == "lm_head.weight":
        return scalar or spec.tied
    return not scalar and key.startswith("v_head.")


# ----------------------------------------------------------------------------------------------------------------------
# Import: this TP rank's shard, read slice by slice


def _take(piece: Piece, reader: Reader, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
    """Megatron-oriented [start, stop) slice of a piece along megatron ``dim`` (None: the whole piece)."""
    if piece.optional and piece.key not in reader:
        return torch.zeros(piece.hf_shape)
    out_dim = 1 if piece.transpose else 0  # HF output dim == megatron dim 0
    if dim is None and piece.size is not None:
        dim, start, stop = 0, 0, piece.size
    if dim is None:
        t = reader.read(piece.key)
    else:
        hf_dim = (1 - dim) if piece.transpose else dim
        shift = piece.offset if hf_dim == out_dim else 0
        t = reader.read(piece.key, hf_dim, start + shift, stop + shift)
    return t.t() if piece.transpose else t


def local_shard(recipe: Recipe, spec: HFSpec, reader: Reader, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    """This TP rank's shard of the megatron parameter that ``recipe`` describes, reading only what it needs."""
    pieces = recipe.pieces
    if recipe.kind == "qkv":
        per_rank = spec.groups // tp
        per = spec.heads // spec.groups
        q_rows, kv_rows = per_rank * per * spec.head_dim, per_rank * spec.head_dim
        q = _take(pieces[0], reader, 0, rank * q_rows, (rank + 1) * q_rows)
        k, v = (_take(x, reader, 0, rank * kv_rows, (rank + 1) * kv_rows) for x in pieces[1:])
        return fuse_qkv(q, k, v, spec.heads // tp, per_rank, spec.head_dim)
    if recipe.kind == "gated":
        rows = spec.ffn // tp
        return torch.cat([_take(x, reader, 0, rank * rows, (rank + 1) * rows) for x in pieces])
    (piece,) = pieces
    if recipe.kind == "vocab":  # rows [start, start + per) of the padded table; rows past the real vocab are zero
        per = padded_vocab // tp
        start, stop = rank * per, min((rank + 1) * per, spec.vocab)
        real = _take(piece, reader, 0, start, stop) if stop > start else None
        pad = torch.zeros(per - max(stop - start, 0), spec.hidden, dtype=real.dtype if real is not None else None)
        return pad if real is None else torch.cat([real, pad])
    if recipe.split is None or tp == 1:
        return _take(piece, reader)
    shape = piece.hf_shape[::-1] if piece.transpose else piece.hf_shape  # megatron orientation
    n = shape[recipe.split] // tp
    return _take(piece, reader, recipe.split, rank * n, (rank + 1) * n)


# ----------------------------------------------------------------------------------------------------------------------
# Export: full tensors -> HF state dict


def to_hf_state_dict(
    sd: dict[str, torch.Tensor], spec: HFSpec, scalar: bool, drop_head_bias: bool = False, check_values: bool = True
) -> dict[str, torch.Tensor]:
    """Full (TP1PP1, global-name) megatron state dict -> HF state dict for ``spec`` (vocab padding stripped). Works
    on any subset of the parameters (each HF tensor comes from one of them) and on meta tensors with
    ``check_values=False`` (names and shapes only)."""
    table = recipes(spec, scalar)
    unknown = sorted(set(sd) - set(table))
    if unknown:
        raise ConversionError(f"no HF mapping for mrlhf parameters {unknown[:5]} ({spec.model_type})")
    blocks: dict[str, list[tuple[Piece, torch.Tensor]]] = {}
    for name, tensor in sd.items():
        recipe = table[name]
        if recipe.kind == "qkv":
            values = split_qkv(tensor, spec.heads, spec.groups, spec.head_dim)
        elif recipe.kind == "gated":
            values = tensor.chunk(2, dim=0)
        elif recipe.kind == "vocab":
            values = (tensor[: spec.vocab],)
        else:
            values = (tensor,)
        for piece, value in zip(recipe.pieces, values):
            if piece.optional:
                if check_values and bool(value.any()) and not drop_head_bias:
                    raise ConversionError(
                        f"mrlhf parameter {name} is nonzero ({value.flatten()[:4].tolist()}) but HF's {piece.key} does "
                        f"not exist; pass --drop-head-bias to export without it (a reward shift)"
                    )
                continue
            blocks.setdefault(piece.key, []).append((piece, value))
    out = {}
    for key, parts in blocks.items():
        parts.sort(key=lambda pv: pv[0].offset)
        tensor = torch.cat([v for _, v in parts]) if len(parts) > 1 else parts[0][1]
        if parts[0][0].transpose:
            tensor = tensor.t()
        if tuple(tensor.shape) != parts[0][0].hf_shape:
            raise ConversionError(f"{key}: built shape {list(tensor.shape)}, expected {list(parts[0][0].hf_shape)}")
        out[key] = tensor.contiguous()
    return out


def to_hf_gpt2(sd: dict[str, torch.Tensor], cfg, vocab_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(GPT2Config kwargs, GPT2LMHeadModel state dict, the tied ``lm_head.weight`` included) of a full state dict."""
    return _config_and_state(sd, cfg, vocab_size, "gpt2")


def to_hf_llama(sd: dict[str, torch.Tensor], cfg, vocab_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LlamaConfig / Qwen2Config kwargs, *ForCausalLM state dict) of a full state dict."""
    return _config_and_state(sd, cfg, vocab_size, None)


def _config_and_state(sd, cfg, vocab_size: int, model_type: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    spec = spec_from_run_config(cfg, vocab_size, model_type, "lm")
    out = to_hf_state_dict(sd, spec, scalar=False)
    if spec.tied:  # for load_state_dict into a freshly built model, which lists the tied head too
        out["lm_head.weight"] = out[
            spec.prefix + ("wte.weight" if spec.model_type == "gpt2" else "embed_tokens.weight")
        ]
    config = hf_config_for_export(spec, False, "float32", None, {})
    return {k: v for k, v in config.items() if k not in ("architectures", "model_type")}, out
