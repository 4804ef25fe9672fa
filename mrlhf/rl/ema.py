"""Exponential moving average of model parameters (e.g. an EMA policy or reference)."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place ``ema = decay * ema + (1 - decay) * p`` for each pair of tensors."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} tensors but the model has {len(params)}")
    for i, (e, p) in enumerate(zip(ema_params, params)):
        if e.shape != p.shape:
            raise ValueError(f"EMA tensor {i} has shape {tuple(e.shape)} but the parameter has {tuple(p.shape)}")
    weight = 1.0 - decay
    for e, p in zip(ema_params, params):
        if e.dtype in (torch.float32, torch.float64):
            e.lerp_(p.to(device=e.device, dtype=e.dtype), weight)
        else:  # low precision: blend in fp32, round once
            e.copy_(e.float().lerp_(p.to(device=e.device, dtype=torch.float32), weight))
