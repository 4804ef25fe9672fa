"""Residency: keep a frozen model's weights in host memory between the phases that use it, and bring them back.

``offload`` copies every parameter and buffer to a host tensor (pinned when CUDA exists, so the copy back overlaps
other work) and releases the device storage: the module keeps its parameters, each now an empty tensor on the
compute device, so a forward through an offloaded model fails loudly instead of silently using stale memory.
``reload`` moves the host copies back. The same happens on a CPU-only machine -- a copy into fresh host tensors and
the originals released -- so the state machine is exercised (and tested) where the tests run.

``device_bytes`` reports what a model, its gradients and its optimizer state hold on a device: the per-phase memory
report of PPO. Optimizer state of an idle model (PPO's actor and critic outside training, ``ppo.offload_optimizer``)
moves the same way with :func:`offload_optimizer` / :func:`reload_optimizer`.
"""

from __future__ import annotations

import torch


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def offload(model: torch.nn.Module) -> None:
    """Parameters and buffers to (pinned) host copies; the device storage is released. Idempotent."""
    if is_offloaded(model):
        return
    model.mrlhf_host_copies = _to_host(_tensors(model))
    model.mrlhf_offloaded = True


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` in (pinned, when CUDA exists) host memory; each original's storage is released (an empty
    tensor of its dtype on its device), so nothing of it stays on the device."""
    pin = torch.cuda.is_available()
    host = []
    for t in tensors:
        copy = t.data.to("cpu", copy=True)
        host.append(copy.pin_memory() if pin else copy)
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return host


def reload(model: torch.nn.Module, device: torch.device) -> None:
    """Parameters and buffers back on ``device`` (a no-op for a model that is not offloaded, except that tensors
    elsewhere are moved to ``device``)."""
    if not is_offloaded(model):
        for t in _tensors(model):
            if t.device != device:
                t.data = t.data.to(device)
        return
    _from_host(_tensors(model), model.mrlhf_host_copies, device)
    model.mrlhf_host_copies = None
    model.mrlhf_offloaded = False


def _from_host(tensors: list[torch.Tensor], host: list[torch.Tensor], device: torch.device) -> None:
    """Undo :func:`_to_host`: each tensor's data from its host copy, on ``device``."""
    assert len(tensors) == len(host), "the tensors changed while offloaded"
    for t, h in zip(tensors, host):
        t.data = h.to(device, non_blocking=True)


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
        steps = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() == 0]
        report["optimizer"] = size(_optimizer_tensors(optimizer)) + size(steps)
    return report


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """An ``Optimizer``'s own device state: AdamW's moments (not the 0-d step counters) and the fp32 masters of
    low-precision parameters (not the model's parameters themselves, which full-precision runs step in place)."""
    inner = getattr(optimizer, "inner", optimizer)
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = list(getattr(optimizer, "targets", {}).values()) if getattr(optimizer, "use_master", False) else []
    return state + masters


def offload_optimizer(optimizer) -> None:
    """An idle model's optimizer state to (pinned) host copies, the device storage released, as :func:`offload`
    does for weights (also on a CPU-only machine). Idempotent; state created later (AdamW's first step) is not
    affected until the next call."""
    if optimizer_offloaded(optimizer):
        return
    optimizer.mrlhf_host_copies = _to_host(_optimizer_tensors(optimizer))


def reload_optimizer(optimizer, device: torch.device) -> None:
    """The optimizer state back on ``device`` (a no-op when it is not offloaded)."""
    if not optimizer_offloaded(optimizer):
        return
    _from_host(_optimizer_tensors(optimizer), optimizer.mrlhf_host_copies, device)
    optimizer.mrlhf_host_copies = None


def optimizer_offloaded(optimizer) -> bool:
    return getattr(optimizer, "mrlhf_host_copies", None) is not None
