"""Named, device-agnostic collectives and pipeline send/recv of activations.

Point-to-point traffic goes through ``dist.batch_isend_irecv`` so that a send and a receive posted by two
neighbouring stages at the same time never deadlock (blocking send/recv does on gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_RUN_DEVICE: torch.device | None = None


def set_run_device(device: torch.device | None) -> None:
    """The device every collective's tensors must live on (``init_distributed`` sets it: cuda under NCCL)."""
    global _RUN_DEVICE
    _RUN_DEVICE = None if device is None else torch.device(device)


def run_device() -> torch.device:
    """The run's device (cpu before ``init_distributed``)."""
    return _RUN_DEVICE or torch.device("cpu")


def _on_run_device(t: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a tensor that is not on the run's device -- also in a one-rank run, where the collective itself is
    skipped, so a single-GPU run finds every call site that would hand NCCL a CPU tensor."""
    if _RUN_DEVICE is not None and t.device.type != _RUN_DEVICE.type:
        raise RuntimeError(
            f"comm.{what}: got a tensor on {t.device}, but this run's collectives take {_RUN_DEVICE.type} tensors "
            "(NCCL has no CPU backend): create it with device=ctx.device"
        )
    return t


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_dp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce in place over the data-parallel group."""
    _on_run_device(t, "all_reduce_dp")
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=ps.get_data_parallel_group())
    return t


def all_reduce_tp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce in place over the tensor-parallel group."""
    _on_run_device(t, "all_reduce_tp")
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=ps.get_tensor_model_parallel_group())
    return t


def sum_tp_differentiable(t: torch.Tensor) -> torch.Tensor:
    """Sum of every TP rank's partial ``t`` (out of place); the backward passes the gradient through unchanged, as
    for any partial sum whose consumer is replicated over TP (megatron's reduce_from_tensor_model_parallel_region)."""
    _on_run_device(t, "sum_tp_differentiable")
    if ps.get_tensor_model_parallel_world_size() == 1:
        return t
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(t.clone())


def all_reduce_pp(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce in place over the pipeline group."""
    _on_run_device(t, "all_reduce_pp")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=ps.get_pipeline_model_parallel_group())
    return t


def all_reduce_model_parallel(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce in place over TP and PP together (one model replica)."""
    _on_run_device(t, "all_reduce_model_parallel")
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=ps.get_model_parallel_group())
    return t


def all_reduce_embedding_group(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first and last stage (tied word-embedding gradients with PP > 1)."""
    _on_run_device(t, "all_reduce_embedding_group")
    if ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
        dist.all_reduce(t, group=ps.get_embedding_group())
    return t


def broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """Every stage receives the last stage's tensor (same shape and dtype must be allocated everywhere)."""
    _on_run_device(t, "broadcast_from_last_stage")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def broadcast_from_dp_rank(t: torch.Tensor, dp_rank: int) -> torch.Tensor:
    """Every dp rank receives the tensor of ``dp_rank`` (used by the ZeRO-1 optimizer after its step)."""
    _on_run_device(t, "broadcast_from_dp_rank")
    if ps.get_data_parallel_world_size() > 1:
        src = dist.get_global_rank(ps.get_data_parallel_group(), dp_rank)
        dist.broadcast(t, src=src, group=ps.get_data_parallel_group())
    return t


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Every rank of the job receives global rank 0's tensor (the serving engine's per-tick command)."""
    _on_run_device(t, "broadcast_from_rank0")
    if world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def broadcast_from_tp_rank0(t: torch.Tensor) -> torch.Tensor:
    """Every TP rank receives TP rank 0's tensor (work done once per TP group, e.g. a Python reward function)."""
    _on_run_device(t, "broadcast_from_tp_rank0")
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return t


def all_gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's copy of ``t`` (same shape everywhere), in TP-rank order."""
    _on_run_device(t, "all_gather_tp")
    if ps.get_tensor_model_parallel_world_size() == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def isend_next_stage(t: torch.Tensor) -> dist.Work:
    """Post a send of ``t`` to the next pipeline stage (the generation ring); wait on the returned handle."""
    _on_run_device(t, "isend_next_stage")
    return dist.isend(t, ps.get_pipeline_model_parallel_next_rank(), group=ps.get_pipeline_model_parallel_group())


def irecv_prev_stage(t: torch.Tensor) -> dist.Work:
    """Post a receive into ``t`` from the previous pipeline stage (the generation ring)."""
    _on_run_device(t, "irecv_prev_stage")
    return dist.irecv(t, ps.get_pipeline_model_parallel_prev_rank(), group=ps.get_pipeline_model_parallel_group())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline point-to-point


def _p2p(
    send_next: torch.Tensor | None = None,
    send_prev: torch.Tensor | None = None,
    recv_prev: tuple[torch.Size, torch.dtype, torch.device] | None = None,
    recv_next: tuple[torch.Size, torch.dtype, torch.device] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Post all requested sends/receives together, wait, and return (from_prev, from_next)."""
    ops = []
    from_prev = from_next = None
    for t in (send_next, send_prev):
        if t is not None:
            _on_run_device(t, "p2p send")
    for spec in (recv_prev, recv_next):
        if spec is not None and _RUN_DEVICE is not None and torch.device(spec[2]).type != _RUN_DEVICE.type:
            raise RuntimeError(f"comm p2p receive: buffer on {spec[2]}, but this run communicates on {_RUN_DEVICE.type}")
    group = ps.get_pipeline_model_parallel_group()
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next.contiguous(), ps.get_pipeline_model_parallel_next_rank(), group))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), ps.get_pipeline_model_parallel_prev_rank(), group))
    if recv_prev is not None:
        from_prev = torch.empty(recv_prev[0], dtype=recv_prev[1], device=recv_prev[2])
        ops.append(dist.P2POp(dist.irecv, from_prev, ps.get_pipeline_model_parallel_prev_rank(), group))
    if recv_next is not None:
        from_next = torch.empty(recv_next[0], dtype=recv_next[1], device=recv_next[2])
        ops.append(dist.P2POp(dist.irecv, from_next, ps.get_pipeline_model_parallel_next_rank(), group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return from_prev, from_next


def recv_forward(spec: tuple[torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
    """Receive the previous stage's activation; it becomes a leaf that collects its gradient."""
    t, _ = _p2p(recv_prev=spec)
    assert t is not None
    return t.requires_grad_()


def send_forward(t: torch.Tensor) -> None:
    _p2p(send_next=t.detach())


def recv_backward(spec: tuple[torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
    _, g = _p2p(recv_next=spec)
    assert g is not None
    return g


def send_backward(g: torch.Tensor) -> None:
    _p2p(send_prev=g)


def send_forward_recv_backward(t: torch.Tensor, spec: tuple[torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
    _, g = _p2p(send_next=t.detach(), recv_next=spec)
    assert g is not None
    return g


def send_backward_recv_forward(g: torch.Tensor, spec: tuple[torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
    t, _ = _p2p(send_prev=g, recv_prev=spec)
    assert t is not None
    return t.requires_grad_()


def send_forward_recv_forward(
    t: torch.Tensor | None, spec: tuple[torch.Size, torch.dtype, torch.device] | None
) -> torch.Tensor | None:
    """Send this stage's activation on and receive the previous stage's in one batch, either side optional (the
    serving engine's lockstep ring, where every stage forwards one work item per tick)."""
    t, _ = _p2p(send_next=None if t is None else t.detach(), recv_prev=spec)
    return t
