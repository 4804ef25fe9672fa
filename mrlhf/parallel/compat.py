"""The small patches megatron-core needs to run without CUDA (tests and CI run on gloo/CPU).

Applied only when CUDA is absent, all in this one module (see ../shared/MEGATRON_ON_CPU.md):
- ``torch.cuda.current_device()`` returns ``"cpu"`` (RoPE, TP layer buffers, dist_checkpointing use it as a device);
- ``torch.cuda.synchronize()`` is a no-op (checkpoint save calls it);
- while a model is built, ``Tensor.cuda()`` returns the tensor itself (tied embeddings with PP > 1 call it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_compat() -> None:
    """Install the process-wide patches once; a no-op where CUDA exists."""
    global _applied
    if _applied or cuda_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    _applied = True


@contextlib.contextmanager
def building_model() -> Iterator[None]:
    """Context for model construction: ``Tensor.cuda`` is the identity when CUDA is absent."""
    if cuda_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[assignment]
