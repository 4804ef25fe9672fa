"""Residency: keep a frozen model's weights in host memory between the phases that use it, and bring them back.

``offload`` copies every parameter and buffer to a host tensor (pinned when CUDA exists, so the copy back overlaps
other work) and releases the device storage: the module keeps its parameters, each now an empty tensor on the
compute device, so a forward through an offloaded model fails loudly instead of silently using stale memory.
``reload`` moves the host copies back. The same happens on a CPU-only machine -- a copy into fresh host tensors and
the originals released -- so the state machine is exercised (and tested) where the tests run.

``device_bytes`` reports what a model, its gradients and its optimizer state hold on a device: the per-phase memory
report of PPO. Optimizer state of an idle model moves with :func:`offload_optimizer` / :func:`reload_optimizer`.
"""

from __future__ import annotations

import torch


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def offload(model: torch.nn.Module) -> None:
    """Parameters and buffers to (pinned) host copies; the device storage is released. Idempotent."""
    if is_offloaded(model):
        return
    pin = torch.cuda.is_available()
    host = []
    for t in _tensors(model):
        copy = t.data.to("cpu", copy=True)
        host.append(copy.pin_memory() if pin else copy)
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    model.mrlhf_host_copies = host
    model.mrlhf_offloaded = True


def reload(model: torch.nn.Module, device: torch.device) -> None:
    """Parameters and buffers back on ``device`` (a no-op for a model that is not offloaded, except that tensors
    elsewhere are moved to ``device``)."""
    if not is_offloaded(model):
        for t in _tensors(model):
            if t.device != device:
                t.data = t.data.to(device)
        return
    for t, h in zip(_tensors(model), model.mrlhf_host_copies):
        t.data = h.to(device, non_blocking=True)
    model.mrlhf_host_copies = None
    model.mrlhf_offloaded = False


def is_offloaded(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "mrlhf_offloaded", False))


def device_bytes(model: torch.nn.Module, device: torch.device, optimizer=None) -> dict[str, int]:
    """Bytes held on ``device``: parameters and buffers, gradients, and (given its Optimizer) optimizer state."""

    def size(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts if t is not None and t.device == device)

    grads = [g for p in model.parameters() for g in (p.grad, getattr(p, "main_grad", None)) if g is not None]
    report = {"params": size(_tensors(model)), "grads": size(grads)}
    if optimizer is not None:
        inner = getattr(optimizer, "inner", optimizer)
        state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        masters = list(getattr(optimizer, "targets", {}).values()) if getattr(optimizer, "use_master", False) else []
        report["optimizer"] = size(state) + size(masters)
    return report


def _move(tensors, device: torch.device, pin: bool) -> None:
    for t in tensors:
        if t.device == device:
            continue
        host = t.data.to(device, non_blocking=True)
        if pin and device.type == "cpu" and torch.cuda.is_available():
            host = host.pin_memory()
        t.data = host


def offload_optimizer(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        _move([v for v in state.values() if torch.is_tensor(v) and v.dim() > 0], torch.device("cpu"), pin=True)


def reload_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        _move([v for v in state.values() if torch.is_tensor(v) and v.dim() > 0], device, pin=False)
