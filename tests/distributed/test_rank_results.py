"""Rank results reach the parent even when it reads them after the rank has exited.

torch's ForkingPickler sends a tensor put on a multiprocessing queue as a file descriptor that the reader fetches from
the writer's process when it unpickles; a rank that has already exited refuses the connection. CI once failed that way
(ConnectionResetError in ``queue.get``). Both the test harness and the conversion launcher send pickled bytes instead;
these tests read only after the rank process is gone, which fails with the tensor sent as-is.
"""

import multiprocessing as mp
import pickle

import torch
from harness import _child as harness_child
from harness import free_port

from mrlhf.convert import runtime


def _tensors(rank):
    return {"rank": rank, "x": torch.arange(12.0).reshape(3, 4) + rank, "ids": torch.tensor([5, 7], dtype=torch.long)}


def _read_after_exit(child, *extra):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(_tensors, 0, 1, free_port(), queue, (), *extra))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    rank, status, payload = queue.get(timeout=10)
    assert (rank, status) == (0, "ok")
    return pickle.loads(payload)


def _check(result):
    assert result["rank"] == 0
    assert torch.equal(result["x"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(result["ids"], torch.tensor([5, 7]))


def test_harness_result_readable_after_rank_exit():
    _check(_read_after_exit(harness_child, {}))


def test_conversion_result_readable_after_rank_exit():
    _check(_read_after_exit(runtime._child))
