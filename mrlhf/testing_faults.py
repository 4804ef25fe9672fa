"""Fault injection for crash tests: ``MRLHF_FAULT=<point>`` makes the process die abruptly at that point.

Points: ``save_after_model`` (model shards written, checkpoint not committed), ``save_before_latest`` (committed,
tracker not yet updated), ``after_step:<k>`` (right after optimizer step k and its checkpoint, if any).
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
