"""Device-agnostic microbatch schedules over the pipeline: 1F1B training and forward-only scoring.

Every stage is handed the same list of microbatches (each rank loads the data), so each stage knows the
activation shape ``[s, b, h]`` of every microbatch without extra messages. The first stage embeds tokens, the
last stage turns its role's output into a loss with ``loss_fn``. With PP = 1 the 1F1B schedule degenerates to
forward+backward per microbatch (plain gradient accumulation).

1F1B (PipeDream-flush): stage r runs ``pp - r - 1`` warm-up forwards, then alternates one forward and one
backward, then drains the remaining backwards, so at most ``pp - r`` activations are alive at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf.parallel import comm

Microbatch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Microbatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _activation_spec(mb: Microbatch, hidden_size: int, dtype: torch.dtype, device: torch.device):
    b, s = mb["tokens"].shape
    return torch.Size((s, b, hidden_size)), dtype, device


def _run_forward(model, mb: Microbatch, input_tensor: torch.Tensor | None) -> torch.Tensor:
    more = {"logits_from": mb["logits_from"]} if "logits_from" in mb else {}  # PPO microbatches: skip prompt logits
    return model(
        mb["tokens"], mb["position_ids"], mb.get("attention_mask"), input_tensor=input_tensor, targets=mb.get("labels"),
        **more,
    )  # fmt: skip


def pseudo_free(out: torch.Tensor) -> None:
    """A stage's output is dead once sent -- only its autograd graph is needed for the backward -- so its storage is
    swapped for a 1-element tensor (megatron's ``deallocate_output_tensor``): 1F1B then holds the stage's activations
    but not its ``[s, b, h]`` outputs. Views share their base's storage and are left alone."""
    if out._base is None:
        out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


def backward_freed(out: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward from a pseudo-freed output: the autograd engine directly, since ``torch.autograd.backward`` checks that
    ``grad`` has the output's (now 1-element) shape (megatron's ``custom_backward``)."""
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(out,), grad_tensors=(grad,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True,
    )  # fmt: skip


def forward_backward(
    model: torch.nn.Module,
    microbatches: list[Microbatch],
    loss_fn: LossFn,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """One 1F1B pass: gradients of ``sum(loss_fn(...))`` accumulate into ``.grad``; stats come back on the last stage.

    ``loss_fn(output, microbatch) -> (loss, stats)``: the loss is what is backpropagated (scale it for the whole
    global batch); stats are detached tensors for logging.
    """
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    first, last = rank == 0, rank == pp - 1
    n = len(microbatches)
    warmup = min(pp - rank - 1, n)
    spec = [_activation_spec(mb, hidden_size, dtype, device) for mb in microbatches]
    stats: list[dict[str, torch.Tensor]] = []
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []

    def forward(i: int, inp: torch.Tensor | None) -> torch.Tensor:
        out = _run_forward(model, microbatches[i], inp)
        if last:
            loss, st = loss_fn(out, microbatches[i])
            stats.append(st)
            return loss
        return out

    def backward(inp: torch.Tensor | None, out: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
        if last:
            torch.autograd.backward(out)
        else:
            backward_freed(out, grad)
        return None if inp is None else inp.grad

    # warm-up forwards
    for i in range(warmup):
        inp = None if first else comm.recv_forward(spec[i])
        out = forward(i, inp)
        if not last:
            comm.send_forward(out)
            pseudo_free(out)
        inputs.append(inp)
        outputs.append(out)

    # steady state: one forward, one backward
    remaining = n - warmup
    inp = None if (first or remaining == 0) else comm.recv_forward(spec[warmup])
    for k in range(remaining):
        i = warmup + k
        out = forward(i, inp)
        if last:
            grad = None
        else:
            grad = comm.send_forward_recv_backward(out, spec[k])
            pseudo_free(out)
        inputs.append(inp)
        outputs.append(out)
        in_grad = backward(inputs.pop(0), outputs.pop(0), grad)
        if k == remaining - 1:
            inp = None
            if not first:
                comm.send_backward(in_grad)
        elif first:
            inp = None
        else:
            inp = comm.send_backward_recv_forward(in_grad, spec[i + 1])

    # cool-down backwards
    for k in range(warmup):
        j = remaining + k
        grad = None if last else comm.recv_backward(spec[j])
        in_grad = backward(inputs.pop(0), outputs.pop(0), grad)
        if not first:
            comm.send_backward(in_grad)
    return stats


@torch.no_grad()
def forward_only(
    model: torch.nn.Module,
    microbatches: list[Microbatch],
    collect_fn: Callable[[torch.Tensor, Microbatch], Any],
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Any]:
    """Forward every microbatch through the pipeline; ``collect_fn(output, mb)`` results come back on the last stage."""
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    first, last = rank == 0, rank == pp - 1
    results = []
    for mb in microbatches:
        inp = None if first else comm.recv_forward(_activation_spec(mb, hidden_size, dtype, device))
        out = _run_forward(model, mb, inp)
        if last:
            results.append(collect_fn(out, mb))
        else:
            comm.send_forward(out)
    return results
