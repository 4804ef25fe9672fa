"""Helper processes end with the process that started them, however it ends (SIGKILL included).

megatron's checkpoint writer collects write results through a ``multiprocessing.Manager`` queue that it starts at a
process's first save (``filesystem_async._results_queue``, a *spawned* server, which also brings up a resource
tracker). Nothing ties that server to its parent: a trainer killed by SIGKILL or SIGTERM (a Slurm timeout, an OOM
kill, a torchrun teardown) leaves it running, holding the job's stdout open and, on a cluster, blocking a requeue.
:func:`tie_checkpoint_writer` starts that server ourselves, with a watcher thread that ends it within half a second
of its parent's death; the resource tracker then sees its last client go and exits too.
"""

from __future__ import annotations

import os
import threading
import time


def _exit_with_parent(parent: int) -> None:
    """Runs in the helper: end it once ``parent`` is gone (we were re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def tie_checkpoint_writer() -> None:
    """Give megatron's write-results queue a server that dies with this process (once; before the first save).
    Spawned like megatron's own (forking a process that already runs gloo and OpenMP threads is not safe)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", False) is not None:  # already made (or no such queue)
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_exit_with_parent, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager referenced
