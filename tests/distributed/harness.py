"""Run a function on N forked ranks over gloo: import once in the parent, fork, and collect per-rank results.

Forking after megatron is imported saves ~4 s per process compared with torchrun per test. The parent keeps
torch single-threaded so the forked children never inherit a busy OpenMP pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reap_children() -> None:
    """Stop processes this rank started (megatron's checkpoint writer keeps a multiprocessing Manager alive); os._exit
    skips the finalizers that would, and orphans would pile up over a test session."""
    for p in mp.active_children():
        p.terminate()
        p.join(timeout=5)


def _child(fn: Callable, rank: int, world: int, port: int, queue, args: tuple, env: dict[str, str]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    code = 0
    try:
        result = fn(rank, *args)
        # Plain pickle copies tensor storage into the bytes. Putting the tensors themselves would go through torch's
        # ForkingPickler reductions, which pass a file descriptor that the parent fetches from this process's
        # resource sharer *after* it reads the queue -- by then this process may have exited (os._exit below), and the
        # parent dies with "ConnectionResetError: Connection reset by peer" (seen once in CI).
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    finally:
        from mrlhf.parallel.state import destroy_distributed

        try:
            destroy_distributed()
        except Exception:
            pass
        reap_children()
        queue.close()
        queue.join_thread()
        os._exit(code)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
    expect_exit: int | None = None,
) -> list[Any]:
    """``fn(rank, *args)`` on every rank; returns results by rank. With ``expect_exit`` (fault-injection tests) rank 0
    must die with that exit code and the others with it or with an error (a peer vanished); results are ``None``."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args, env or {})) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        if expect_exit is None:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = pickle.loads(payload)
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    break
        for p in procs:
            p.join(timeout=timeout if not errors else 5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("distributed run failed on " + "\n".join(errors))
    if expect_exit is not None:
        codes = [p.exitcode for p in procs]
        ok = codes[0] == expect_exit and all(c in (expect_exit, 1) for c in codes)
        assert ok, f"expected rank 0 to exit with {expect_exit} (others with it or 1), got {codes}"
        return [None] * world_size
    return [results[r] for r in range(world_size)]
