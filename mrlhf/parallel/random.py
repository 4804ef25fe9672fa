"""Random streams for dropout under tensor parallelism, on any device.

Dropout outside tensor-parallel regions (hidden dropout after attention and MLP) acts on activations replicated over
TP, so every TP rank must draw the same mask: the default generator, seeded alike on the ranks of a replica. Dropout
inside a TP region (attention probabilities: each TP rank holds other heads) must draw *independent* masks, so it
runs under :func:`model_parallel_rng`, which swaps in a second stream seeded ``seed + 2718 + tp_rank`` -- megatron's
``model_parallel_cuda_manual_seed`` rule, here for CPU and CUDA alike. On CUDA megatron's own tracker is seeded too,
for megatron/TE modules that fork it. Both streams are saved in checkpoints (:func:`get_states` / :func:`set_states`),
so a resumed run with dropout draws the masks an uninterrupted one would.
"""

from __future__ import annotations

import contextlib

import torch

TP_OFFSET = 2718
_STATES: dict[str, torch.Tensor] = {}


def seed_model_parallel(seed: int, tp_rank: int) -> None:
    """Seed the TP-region stream of this rank (and megatron's CUDA tracker when CUDA is in use)."""
    _STATES.clear()
    gen = torch.Generator().manual_seed(seed + TP_OFFSET + tp_rank)
    _STATES["cpu"] = gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            torch.cuda.manual_seed(seed + TP_OFFSET + tp_rank)
            _STATES["cuda"] = torch.cuda.get_rng_state()
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def model_parallel_rng(device: torch.device):
    """Run the body on this rank's TP-region stream of ``device`` (the default stream is left where it was)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind not in _STATES:  # never seeded (a tool or test without a training run): behave like the default stream
        yield
        return
    get, put = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if kind == "cuda" else (
        torch.get_rng_state, torch.set_rng_state)  # fmt: skip
    default = get()
    put(_STATES[kind])
    try:
        yield
    finally:
        _STATES[kind] = get()
        put(default)


def get_states() -> dict[str, torch.Tensor]:
    """This rank's TP-region streams (and megatron's CUDA tracker states), for a checkpoint."""
    states = {k: v.clone() for k, v in _STATES.items()}
    if "cuda" in _STATES:
        from megatron.core import tensor_parallel

        states["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return states


def set_states(states: dict) -> None:
    tracker = states.get("megatron_tracker")
    _STATES.clear()
    _STATES.update({k: v.clone() for k, v in states.items() if k in ("cpu", "cuda")})
    if tracker is not None and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
