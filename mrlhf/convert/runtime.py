"""What every conversion tool shares: forked ranks over gloo, all-or-nothing output directories, tokenizer files,
and finding/patching a checkpoint's meta.json.

Ranks are forked from the calling process (as ``tests/distributed/harness.py`` does): whatever the caller imported
(megatron, ~5 s) is imported once, and the caller never joins a process group, so library calls leave it clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.managers import SyncManager
from typing import Any

from mrlhf.children import exit_with_parent
from mrlhf.errors import ConversionError, MrlhfError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
TOKENIZER_DIR = "tokenizer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, results, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    launcher = os.getppid()
    _own_checkpoint_writer()
    exit_with_parent(launcher, code=1)
    import torch

    torch.set_num_threads(1)  # never enter an OpenMP pool inherited across fork
    _large_blocks_to_mmap()
    code = 0
    try:
        # Plain pickle bytes: a tensor put as-is goes through torch's ForkingPickler, which hands the parent a file
        # descriptor to fetch from this process after it reads the queue -- a race with this process exiting.
        results.put((rank, "ok", pickle.dumps(fn(rank, *args))))
    except MrlhfError as e:
        results.put((rank, "user", str(e)))
        code = 1
    except BaseException as e:
        # torch DCP hands back what its readers raised (a damaged shard, a refused pickle) inside its own exception
        from mrlhf.safe_load import user_error

        user = user_error(e)
        results.put((rank, "user", str(user)) if user is not None else (rank, "error", traceback.format_exc()))
        code = 1
    finally:
        from mrlhf.parallel.state import destroy_distributed

        with contextlib.suppress(Exception):
            destroy_distributed()
        results.close()
        results.join_thread()
    # A normal exit, not os._exit: multiprocessing then runs this process's finalizers, which shut down the writer's
    # Manager server (it would outlive us otherwise, ~200 MB each).
    sys.exit(code)


def _own_checkpoint_writer() -> None:
    """dist_checkpointing's save collects write results through a Manager queue per process, started on first use
    with the *spawn* method (a new interpreter that re-imports ``__main__``: about a second per rank). Fork it here
    instead, while this rank is still single-threaded, and let it end with the rank even if the rank is killed. It
    must be this rank's own (megatron takes "its" results with get_nowait), never one inherited from the parent.
    Nothing to do where megatron has no such queue."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if hasattr(filesystem_async, "_results_queue"):
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(exit_with_parent, (os.getpid(), 1))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def _large_blocks_to_mmap(threshold: int = 1 << 20) -> None:
    """Serve blocks of 1 MiB and more from mmap, so a freed tensor goes back to the OS. glibc's default threshold
    grows to the largest block freed so far, after which every tensor of that size comes from the heap, which a
    stream of differently sized tensors fragments: peak RSS then creeps up with the number of layers converted."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (setting it also turns off the dynamic adjustment)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` forked ranks (RANK/WORLD_SIZE/MASTER_* set, gloo via
    ``init_distributed``); returns results by rank. A rank's MrlhfError (also one raised inside torch DCP) comes back
    as a ConversionError with the same one-line message."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, results, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    try:
        while len(done) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in done]
                if dead:
                    raise RuntimeError(f"conversion rank {dead[0][0]} died with exit code {dead[0][1]}") from None
                continue
            if status == "user":
                raise ConversionError(payload)
            if status == "error":
                raise RuntimeError(f"conversion rank {rank} failed:\n{payload}")
            done[rank] = pickle.loads(payload)
    finally:
        deadline = time.monotonic() + (5.0 if len(done) < world_size else 60.0)
        for p in procs:  # let ranks exit on their own (their cleanup runs), then stop stragglers
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    return [done[r] for r in range(world_size)]


@contextlib.contextmanager
def atomic_output(out: str) -> Iterator[str]:
    """Yield a temp directory next to ``out``; rename it to ``out`` on success, delete it on any error, so a failed
    conversion leaves no output directory behind (nor parent directories it created)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"{out}: output already exists and is not an empty directory")
    parent = os.path.dirname(out)
    created = []
    probe = parent
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, out)  # replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint root, step directory) for a save_dir with a ``latest`` tracker or one step directory."""
    from mrlhf.checkpoint import LATEST, META, latest_checkpoint

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, LATEST)):
        return path, latest_checkpoint(path)
    if os.path.isfile(os.path.join(path, META)):
        return os.path.dirname(path), path
    raise ConversionError(f"{path}: not an mrlhf checkpoint (no '{LATEST}' tracker and no {META})")


def patch_meta(step_dir: str, extra: dict[str, Any]) -> None:
    """Add keys to a checkpoint's meta.json (still inside the temp output directory, so atomic with it)."""
    from mrlhf.checkpoint import META, read_meta

    meta = read_meta(step_dir) | extra
    path = os.path.join(step_dir, META)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)
    os.replace(f"{path}.tmp", path)


def copy_tokenizer(src: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files of ``src`` (a directory, a tokenizer.json or a sentencepiece .model) into
    ``dst_dir``; returns the file names copied ([] when there are none)."""
    if not src or not os.path.exists(src):
        return []
    if os.path.isdir(src):
        pairs = [(os.path.join(src, n), n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    elif src.endswith(".json"):
        pairs = [(src, "tokenizer.json")]
        sibling = os.path.join(os.path.dirname(src), "tokenizer_config.json")
        pairs += [(sibling, "tokenizer_config.json")] if os.path.isfile(sibling) else []
    else:
        pairs = [(src, "tokenizer.model")]
    if pairs:
        os.makedirs(dst_dir, exist_ok=True)
    for path, name in pairs:
        shutil.copyfile(path, os.path.join(dst_dir, name))
    return [name for _, name in pairs]


def tokenizer_entry(tok_dir: str, files: list[str], final_dir: str) -> tuple[str, str]:
    """(path a run config should name once ``tok_dir`` is moved to ``final_dir``, hash) of a copied tokenizer:
    mrlhf's own Tokenizer hash when it loads (so runs using it match the checkpoint), else sha256 over the files."""
    from mrlhf.data.tokenizer import Tokenizer

    name = "" if "tokenizer.json" in files else ("tokenizer.model" if "tokenizer.model" in files else None)
    if name is not None:
        with contextlib.suppress(MrlhfError):
            return os.path.join(final_dir, name).rstrip("/"), Tokenizer.load(os.path.join(tok_dir, name)).hash
    digest = hashlib.sha256()
    for file in sorted(files):
        with open(os.path.join(tok_dir, file), "rb") as f:
            digest.update(f.read())
    return "", digest.hexdigest() if files else ""
