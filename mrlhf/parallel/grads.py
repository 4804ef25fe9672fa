"""Gradient synchronisation after a schedule: tied-embedding sync over PP, bucketed DP all-reduce, global norm.

The loss a schedule backpropagates is already normalised by the whole global batch, so DP gradients are
*summed*, never averaged.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mrlhf.parallel import comm


def params_with_grad(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sync_tied_embedding_grads(model) -> None:
    """With tied embeddings and PP > 1 the first stage's embedding and the last stage's output weight are one
    parameter held twice: sum their gradients so both copies take the same step."""
    if not getattr(model, "tied_across_stages", False) or not ps.is_rank_in_embedding_group():
        return
    gpt = model.backbone
    if not (gpt.pre_process or gpt.post_process):
        return
    weight = gpt.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    comm.all_reduce_embedding_group(weight.grad)


def all_reduce_dp_grads(params: list[torch.nn.Parameter], bucket_mb: float) -> None:
    """Sum gradients over the DP group in flat buckets of about ``bucket_mb`` MiB (one collective per bucket)."""
    if ps.get_data_parallel_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= limit:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    # buckets are grouped by dtype so one flat tensor can hold them
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        comm.all_reduce_dp(flat)
        for g, synced in zip(group, _unflatten_dense_tensors(flat, group)):
            g.copy_(synced)


def counts_for_norm(p: torch.nn.Parameter) -> bool:
    """Count each logical parameter once: TP-sharded ones on every TP rank, replicated ones on TP rank 0 only,
    and the last stage's copy of a tied embedding not at all."""
    if getattr(p, "shared", False) and not ps.is_pipeline_first_stage():
        return False
    return getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0


def global_grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the whole model's gradient (one replica: reduced over TP and PP)."""
    device = params[0].device if params else comm.run_device()
    squares = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None and counts_for_norm(p)]
    # summed on the device, reduced once, read on the host once (a host sync per parameter stalls a GPU)
    total = torch.stack(squares).sum().reshape(1) if squares else torch.zeros(1, dtype=torch.float64, device=device)
    comm.all_reduce_model_parallel(total)
    return math.sqrt(float(total))


def clip_grads(params: list[torch.nn.Parameter], max_norm: float, norm: float) -> None:
    """Scale gradients so the global norm is at most ``max_norm`` (``norm`` from :func:`global_grad_norm`)."""
    if max_norm <= 0 or not math.isfinite(norm):
        return
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
