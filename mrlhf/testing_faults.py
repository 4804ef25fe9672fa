"""Fault injection for crash tests: ``MRLHF_FAULT=<point>`` makes the process die abruptly at that point.

Points: ``save_after_model`` (model shards written, checkpoint not committed), ``save_rank_state`` (per-rank state
written, not yet hashed), ``save_before_latest`` (committed, tracker not yet updated), ``after_step:<k>`` (right
after optimizer step k and its checkpoint, if any).
``os._exit`` skips every cleanup handler, like a SIGKILL would.
"""

from __future__ import annotations

import os


def maybe_fault(point: str) -> None:
    if os.environ.get("MRLHF_FAULT") == point:
        # megatron's checkpoint writer keeps a multiprocessing Manager; stop it so crash tests leave no orphans
        import multiprocessing

        for child in multiprocessing.active_children():
            child.terminate()
        os._exit(137)


def fault_ids(variable: str, first_id: int, count: int) -> list[int]:
    """Local row indices whose global sequence id (``first_id + i``) is listed in ``$variable`` (comma-separated):
    the sequences a PPO fault test breaks (``MRLHF_FAULT_NAN_REWARD``, ``MRLHF_FAULT_EMPTY_RESPONSE``)."""
    listed = os.environ.get(variable)
    if not listed:
        return []
    wanted = {int(x) for x in listed.split(",") if x.strip()}
    return [i for i in range(count) if first_id + i in wanted]


def poison_gradients(model, rank: int, step: int) -> None:
    """``MRLHF_FAULT_NAN_LOSS=<rank>:<step>`` in SFT/RM/DPO: that rank's gradients turn NaN at that step (0-based),
    as a diverging loss would make them; the step is then skipped on every rank."""
    if nan_loss_requested(rank, step):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
                return


def nan_loss_requested(rank: int, iteration: int) -> bool:
    """``MRLHF_FAULT_NAN_LOSS=<rank>:<iteration>``: that global rank's actor loss is NaN at that PPO iteration."""
    spec = os.environ.get("MRLHF_FAULT_NAN_LOSS")
    if not spec:
        return False
    ranks, _, iters = spec.partition(":")
    return rank in {int(r) for r in ranks.split(",")} and (iters == "*" or iteration in {int(i) for i in iters.split(",")})
