"""Residency: move a frozen model's parameters to host memory between the phases that use it, and back.

On a GPU the host copies are pinned so the copy back overlaps with other work; on a CPU-only machine both moves
are no-ops (the parameters already live in host memory). Optimizer state of a model that is idle can be moved the
same way with :func:`offload_optimizer` / :func:`reload_optimizer`.
"""

from __future__ import annotations

import torch


def _move(tensors, device: torch.device, pin: bool) -> None:
    for t in tensors:
        if t.device == device:
            continue
        host = t.data.to(device, non_blocking=True)
        if pin and device.type == "cpu" and torch.cuda.is_available():
            host = host.pin_memory()
        t.data = host


def offload(model: torch.nn.Module) -> None:
    """Parameters and buffers to (pinned) host memory."""
    _move(list(model.parameters()) + list(model.buffers()), torch.device("cpu"), pin=True)
    model.mrlhf_offloaded = True


def reload(model: torch.nn.Module, device: torch.device) -> None:
    """Parameters and buffers back to ``device``."""
    _move(list(model.parameters()) + list(model.buffers()), device, pin=False)
    model.mrlhf_offloaded = False


def is_offloaded(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "mrlhf_offloaded", False))


def offload_optimizer(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        _move([v for v in state.values() if torch.is_tensor(v) and v.dim() > 0], torch.device("cpu"), pin=True)


def reload_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        _move([v for v in state.values() if torch.is_tensor(v) and v.dim() > 0], device, pin=False)
