"""Parameter and checkpoint key names of Transformer Engine layers vs megatron's local layers.

TE fuses the input norm into ``linear_qkv`` and the pre-MLP norm into ``linear_fc1``; the local layers keep them as
modules. Everything else is named alike (TE adds ``_extra_state`` entries for FP8 metadata, which carry no weights).
The maps below rename one onto the other, for global parameter names (``decoder.layers.3.input_layernorm.weight``)
and for megatron's sharded-checkpoint keys (``decoder.layers.input_layernorm.weight``, layer index as an axis) alike.
"""

from __future__ import annotations

# (local, TE) name parts
PAIRS = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ("pre_mlp_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
)
IMPLS = ("local", "te")


def _swap(name: str, src: int) -> str:
    for pair in PAIRS:
        old, new = pair[src], pair[1 - src]
        if name.endswith(old) and (len(name) == len(old) or name[-len(old) - 1] == "."):
            return name[: -len(old)] + new
    return name


def local_to_te(name: str) -> str:
    """``...layers.i.input_layernorm.weight`` -> ``...layers.i.self_attention.linear_qkv.layer_norm_weight``."""
    return _swap(name, 0)


def te_to_local(name: str) -> str:
    """The inverse of :func:`local_to_te`."""
    return _swap(name, 1)


def convert_name(name: str, src: str, dst: str) -> str:
    """``name`` as written by implementation ``src``, renamed for implementation ``dst``."""
    if src not in IMPLS or dst not in IMPLS:
        raise ValueError(f"unknown layer implementation {src!r} or {dst!r}; expected one of {IMPLS}")
    if src == dst:
        return name
    return local_to_te(name) if src == "local" else te_to_local(name)


def rename_sharded_keys(sharded: dict, src: str, dst: str) -> dict:
    """A copy of a megatron sharded state dict whose ShardedTensor keys name the checkpoint written by ``src``, for a
    model built with ``dst`` (dict keys stay the model's own, so the loaded state dict fits the model). Entries of
    ``_extra_state`` (TE's FP8 metadata) are dropped when the other side has none."""
    import dataclasses

    from megatron.core.dist_checkpointing import ShardedTensor

    out = {}
    for k, v in sharded.items():
        if dst != src and k.endswith("_extra_state"):
            continue
        if isinstance(v, ShardedTensor):
            v = dataclasses.replace(v, key=convert_name(v.key, dst, src))
        out[k] = v
    return out
