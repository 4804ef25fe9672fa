"""The one place that picks layer implementations: Transformer Engine when usable, local megatron layers otherwise."""

from __future__ import annotations

import copy
import functools

import torch

from mrlhf.config import ModelConfig


@functools.cache
def transformer_engine_available() -> bool:
    """TE is used only with CUDA (the CPU-less meta-package breaks megatron imports; see MEGATRON_ON_CPU.md)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False


def get_layer_spec(model: ModelConfig, use_te: bool | None = None):
    """megatron-core TransformerLayer spec for the flavour; local layers use our SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from mrlhf.models.attention import SDPACoreAttention

    use_te = transformer_engine_available() if use_te is None else use_te
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    normalization = "RMSNorm" if model.flavour == "llama" else "LayerNorm"
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def describe_backend() -> str:
    return "transformer-engine" if transformer_engine_available() else "local (torch SDPA)"
