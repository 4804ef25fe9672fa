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


def grad_of(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient to reduce, clip and step with: the fp32 ``main_grad`` when accumulated in fp32, else ``.grad``."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def accumulate_in_fp32(params: list[torch.nn.Parameter]) -> None:
    """megatron's ``grad_reduce_in_fp32`` for low-precision parameters: each backward's gradient is added into an
    fp32 ``main_grad`` (and the bf16 ``.grad`` freed at once), so accumulation over microbatches, the DP all-reduce
    and the norm all run in fp32 instead of bf16's 8 mantissa bits."""

    def hook(param: torch.nn.Parameter) -> None:
        g = param.grad.float()
        param.main_grad = g if param.main_grad is None else param.main_grad.add_(g)
        param.grad = None

    for p in params:
        if p.dtype != torch.float32 and not hasattr(p, "main_grad"):
            p.main_grad = None
            p.register_post_accumulate_grad_hook(hook)


def _ensure_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """``grad_of(p)``, made zeros when this rank's microbatches never reached ``p`` (every rank joins the reduce)."""
    if grad_of(p) is None:
        if hasattr(p, "main_grad"):
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
        else:
            p.grad = torch.zeros_like(p)
    return grad_of(p)


def sync_tied_embedding_grads(model) -> None:
    """With tied embeddings and PP > 1 the first stage's embedding and the last stage's output weight are one
    parameter held twice: sum their gradients so both copies take the same step."""
    if not getattr(model, "tied_across_stages", False) or not ps.is_rank_in_embedding_group():
        return
    gpt = model.backbone
    if not (gpt.pre_process or gpt.post_process):
        return
    comm.all_reduce_embedding_group(_ensure_grad(gpt.shared_embedding_or_output_weight()))


def all_reduce_dp_grads(params: list[torch.nn.Parameter], bucket_mb: float) -> None:
    """Sum gradients over the DP group in flat buckets of about ``bucket_mb`` MiB (one collective per bucket)."""
    if ps.get_data_parallel_world_size() == 1:
        return
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        g = _ensure_grad(p)
        bucket.append(g)
        size += g.numel() * g.element_size()
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
    squares = [g.detach().double().pow(2).sum() for p in params if (g := grad_of(p)) is not None and counts_for_norm(p)]
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
            if (g := grad_of(p)) is not None:
                g.mul_(coef)
