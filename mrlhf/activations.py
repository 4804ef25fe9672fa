"""Activation functions that a run's config selects: a leaf module (torch only, nothing from mrlhf), so
``RunConfig.to_transformer_config`` and the decode path (``generation/fast_decode.py``, which recognises GPT-2's GELU by
identity to fuse it into ``decode_linear``) share one function object without ``config`` importing upward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation), as in HF ``gelu_new``."""
    return F.gelu(x, approximate="tanh")
