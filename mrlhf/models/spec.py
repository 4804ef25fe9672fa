"""The one place that picks layer implementations: Transformer Engine or local megatron layers.

``model.transformer_impl`` decides: ``te`` (TE linears, with the input and pre-MLP norms fused into ``linear_qkv`` /
``linear_fc1`` as ``layer_norm_weight``), ``local`` (megatron's local layers and norms) or ``auto`` (te when TE imports
on a CUDA machine). With either, core attention is mrlhf's :class:`~mrlhf.models.attention.SDPACoreAttention`: the
KV-cache decode hook of generation lives there, and it honours padding and packing masks the same way in training and
decode. TE's own core attention would bypass both (generation would attend to nothing but the current token), so the
TE spec keeps TE where its kernels pay -- the GEMMs and fused norms -- and torch SDPA (flash/efficient kernels on
CUDA) for attention.

A saved checkpoint's keys differ between the two (TE has no ``input_layernorm`` / ``pre_mlp_layernorm`` modules):
:mod:`mrlhf.models.keymap` maps one onto the other, so a checkpoint loads, reshards and converts whichever
implementation wrote it.
"""

from __future__ import annotations

import copy
import functools

import torch

from mrlhf.config import ModelConfig
from mrlhf.errors import ConfigError


@functools.cache
def transformer_engine_import_error() -> str | None:
    """None when TE is usable here, else why not (TE needs CUDA; the CPU-less meta-package breaks megatron imports)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception as e:  # a broken TE install raises anything from ImportError to RuntimeError
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def transformer_engine_available() -> bool:
    return transformer_engine_import_error() is None


def resolve_impl(model: ModelConfig) -> str:
    """'te' or 'local' for this machine; ``te`` asked for explicitly and unusable is a ConfigError."""
    if model.transformer_impl == "te":
        why = transformer_engine_import_error()
        if why is not None:
            raise ConfigError(f"model.transformer_impl=te but Transformer Engine is not usable here ({why})")
        return "te"
    if model.transformer_impl == "local":
        return "local"
    return "te" if transformer_engine_available() else "local"


def get_layer_spec(model: ModelConfig, impl: str | None = None):
    """megatron-core TransformerLayer spec for the flavour and implementation, with our SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from mrlhf.models.attention import SDPACoreAttention

    impl = impl or resolve_impl(model)
    if impl == "te":
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        normalization = "RMSNorm" if model.flavour == "llama" else "LayerNorm"
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def describe_backend(model: ModelConfig | None = None) -> str:
    """Which layers a run uses, and why (logged at the start of every run)."""
    why = transformer_engine_import_error()
    impl = resolve_impl(model) if model is not None else ("te" if why is None else "local")
    if impl == "te":
        return "layers: Transformer Engine linears + fused norms, mrlhf SDPA core attention"
    asked = model.transformer_impl if model is not None else "auto"
    reason = "" if asked == "local" else f" (Transformer Engine not used: {why})"
    return f"layers: megatron local linears and norms, mrlhf SDPA core attention{reason}"
