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


def exit_with_parent(parent: int, code: int = 0) -> None:
    """End this process with ``code`` once ``parent`` is gone (it was killed; we were re-parented), from a daemon
    thread. Runs in helper processes (their start function) and in forked ranks."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(code)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


_fork_parent = {"pid": 0, "installed": False}


def _before_fork() -> None:
    _fork_parent["pid"] = os.getpid()


def _die_with_parent() -> None:
    """In a child forked by this process (megatron's shard-writer workers): SIGKILL when the parent dies
    (PR_SET_PDEATHSIG), so a trainer killed mid-save leaves no writer behind; a parent already gone ends it now."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except Exception:  # not Linux / no libc: the writers are short-lived anyway
        return
    if os.getppid() != _fork_parent["pid"]:
        os._exit(0)


def forked_children_die_with_us() -> None:
    """Every process this one forks from now on is killed when this one dies (Linux; once per process)."""
    if not _fork_parent["installed"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_die_with_parent)
        _fork_parent["installed"] = True


def tie_checkpoint_writer() -> None:
    """Give megatron's write-results queue a server that dies with this process (once; before the first save), and
    make the shard writers it forks during a save die with it too. The server is spawned like megatron's own (forking
    a process that already runs gloo and OpenMP threads is not safe)."""
    forked_children_die_with_us()
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", False) is not None:  # already made (or no such queue)
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(exit_with_parent, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager referenced
