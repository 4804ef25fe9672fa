"""Integrity manifest of a checkpoint: sizes and sha256 hashes of every file, written at save, checked on load.

``meta.json`` of a checkpoint holds ``"files": {"actor/__0_0.distcp": {"size": N, "piece": P, "sha256": [...]}}``
(paths relative to the step directory; ``meta.json`` itself is not listed): the sha256 of each P-byte piece of the
file, so that the pieces of one large file hash on all cores (sha256 runs at ~1 GB/s per core; a file of at most one
piece has one digest, its ``sha256sum``). At save each rank hashes the files it wrote, right after writing them (they
are still in its page cache; the model shards while the optimizer state is written), and leaves its share in
``ranks/sha256_r{rank}.json``; rank 0 folds the shares into ``meta.json`` before the commit.

On load every file is checked by whoever reads it, just before reading: the size first (a truncated or missing shard
costs one ``stat``), then the hash, once per process and file. A mismatch is a :class:`CheckpointError` that names the
file and what is wrong. Hashes catch damage (bit rot, truncation, a copy cut short, a shard from another save); they
do not stop a forger, who can rewrite ``meta.json`` too -- safety against a hostile checkpoint comes from loading
never unpickling arbitrary objects (:mod:`mrlhf.safe_load`). ``checkpoint.verify_integrity=false`` skips the hashes
(sizes are still checked); checkpoints saved before manifests existed load unverified, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from mrlhf.errors import CheckpointError

META = "meta.json"
PIECE = 128 << 20
"""Bytes per hashed piece: the pieces of one file are hashed in parallel, and a mismatch is located to a piece."""
_READ = 8 << 20

_state = {"verify": True}
_verified: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) of files whose hash matched, this process
_manifests: dict[str, tuple[int, dict | None]] = {}  # step dir -> (meta.json mtime_ns, its "files" or None)
_lock = threading.Lock()
_noted: set[str] = set()


def set_verify(enabled: bool) -> None:
    """Check content hashes on load (the default) or only sizes (``checkpoint.verify_integrity=false``)."""
    _state["verify"] = bool(enabled)


def _piece_digest(path: str, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0 and (chunk := f.read(min(_READ, length))):
            h.update(chunk)  # releases the GIL: pieces hash in parallel threads
            length -= len(chunk)
    return h.hexdigest()


def _workers(tasks: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(tasks, cpus, 16))


def piece_digests(files: list[tuple[str, int]], piece: int) -> list[list[str]]:
    """The sha256 of every ``piece``-byte piece of each (path, size), all pieces of all files hashed in parallel."""
    tasks = [(i, path, k * piece, min(piece, size - k * piece))
             for i, (path, size) in enumerate(files) for k in range(max(1, -(-size // piece)))]  # fmt: skip
    out: list[list[str]] = [[] for _ in files]
    if not tasks:
        return out
    with ThreadPoolExecutor(_workers(len(tasks))) as pool:
        for (i, *_), digest in zip(tasks, pool.map(lambda t: _piece_digest(*t[1:]), tasks)):
            out[i].append(digest)
    return out


def hash_files(root: str, rel_paths: list[str]) -> dict[str, dict]:
    """Manifest entries ``{rel: {"size", "piece", "sha256": [...]}}`` of files under ``root``."""
    sizes = [os.path.getsize(os.path.join(root, rel)) for rel in rel_paths]
    digests = piece_digests([(os.path.join(root, rel), n) for rel, n in zip(rel_paths, sizes)], PIECE)
    return {rel: {"size": n, "piece": PIECE, "sha256": d} for rel, n, d in zip(rel_paths, sizes, digests)}


# ----------------------------------------------------------------------------------------------------------------------
# Save side


def owned_shards(step_dir: str, rank: int, roles: list[str]) -> list[str]:
    """The model files of ``step_dir`` that ``rank`` wrote, relative to it: its own ``.distcp`` shards of every role
    (torch DCP names them ``__{rank}_{i}.distcp``); rank 0 also owns the role directories' shared files
    (``.metadata``, ``common.pt``, ``metadata.json``) and anything else it cannot attribute."""
    mine: list[str] = []
    for role in roles:
        for name in sorted(os.listdir(os.path.join(step_dir, role))):
            m = re.match(r"^__(\d+)_\d+\.distcp$", name)
            owner = int(m.group(1)) if m else 0
            if owner == rank:
                mine.append(f"{role}/{name}")
    return mine


def start_hashing(root: str, rel_paths: list[str]) -> Future:
    """:func:`hash_files` in the background: the model shards are hashed while the optimizer state is written."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(hash_files, root, rel_paths)
    finally:
        pool.shutdown(wait=False)


def write_rank_hashes(step_dir: str, rank: int, hashes: dict[str, dict[str, int | str]]) -> None:
    """Leave this rank's hashes for rank 0 (a file: no collective, and the step directory is on a filesystem every
    rank shares anyway, since rank 0 renames it)."""
    path = os.path.join(step_dir, "ranks", f"sha256_r{rank}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hashes, f)
        f.flush()
        os.fsync(f.fileno())


def collect_manifest(step_dir: str, world: int) -> dict[str, dict[str, int | str]]:
    """Rank 0, after every rank wrote its share: the whole manifest, the share files removed. The shared files of
    each role directory are written last by rank 0 and hashed here."""
    files: dict[str, dict[str, int | str]] = {}
    ranks_dir = os.path.join(step_dir, "ranks")
    for r in range(world):
        path = os.path.join(ranks_dir, f"sha256_r{r}.json")
        with open(path, encoding="utf-8") as f:
            files.update(json.load(f))
        os.remove(path)
    listed = {os.path.join(d, n) for d in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, d))
              for n in os.listdir(os.path.join(step_dir, d))}  # fmt: skip
    files.update(hash_files(step_dir, sorted(listed - set(files))))
    return dict(sorted(files.items()))


# ----------------------------------------------------------------------------------------------------------------------
# Load side


def manifest(step_dir: str) -> dict | None:
    """The ``files`` section of ``step_dir/meta.json``; None when there is no meta.json or it predates manifests."""
    meta_path = os.path.join(step_dir, META)
    try:
        mtime = os.stat(meta_path).st_mtime_ns
    except OSError:
        return None
    with _lock:
        cached = _manifests.get(step_dir)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        with open(meta_path, encoding="utf-8") as f:
            files = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        files = None  # read_meta reports an unreadable meta.json with its position; here it only has no manifest
    if files is not None:
        files = _checked_entries(step_dir, files)
    with _lock:
        _manifests[step_dir] = (mtime, files)
    return files


def _checked_entries(step_dir: str, files: object) -> dict[str, dict]:
    """The manifest's entries as ``{rel: {"size": int, "piece": int, "sha256": [str, ...]}}``. A single ``sha256``
    string is one digest of the whole file (its ``sha256sum``; early manifests wrote that); any other shape is a
    damaged meta.json, named as such -- not reported as a damaged file."""

    def malformed(what: str) -> CheckpointError:
        return CheckpointError(f"{step_dir}/{META}: the integrity manifest is malformed {what}")

    if not isinstance(files, dict):
        raise malformed("(its 'files' is not an object)")
    out: dict[str, dict] = {}
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)):
            raise malformed(f"at the entry for {rel} (expected an object with an integer size)")
        want, piece = entry.get("sha256"), entry.get("piece", PIECE)
        if isinstance(want, str):
            want, piece = [want], max(1, entry["size"])
        if not (isinstance(want, list) and want and all(isinstance(w, str) for w in want)) or not (
            isinstance(piece, int) and piece > 0
        ):
            raise malformed(f"at the entry for {rel} (expected a sha256 digest list and a positive piece size)")
        out[rel] = {**entry, "piece": piece, "sha256": want}
    return out


def _locate(path: str) -> tuple[str, str]:
    """(step dir, path relative to it) of a file inside a checkpoint (``<step>/<role or ranks>/<file>``)."""
    path = os.path.abspath(path)
    sub = os.path.dirname(path)
    step = os.path.dirname(sub)
    return step, os.path.relpath(path, step)


def _note_unverified(step: str) -> None:
    if step in _noted:
        return
    _noted.add(step)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[mrlhf] note: {step} has no integrity manifest (saved before mrlhf wrote hashes): its files are "
              "checked for size only", flush=True)  # fmt: skip


def verify_file(path: str) -> None:
    """Check one checkpoint file against its manifest entry just before it is read (see the module docstring)."""
    verify_files([path])


def verifying() -> bool:
    """Whether loads check content hashes (see :func:`set_verify`)."""
    return _state["verify"]


def verify_files(paths: list[str]) -> None:
    """Check files against the manifest: presence and sizes first (in order), then the hashes of all of them in
    parallel (once per process and file); the first problem raises a CheckpointError naming the file."""
    pending: list[tuple[str, dict, tuple[int, int]]] = []
    for path in paths:
        step, rel = _locate(path)
        files = manifest(step)
        if files is None:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: file is missing")
            _note_unverified(step)
            continue
        entry = files.get(rel)
        if entry is None:
            raise CheckpointError(f"{path}: not in the checkpoint's integrity manifest ({step}/{META}); refusing to "
                                  "read a file the save did not write")  # fmt: skip
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file is missing (the checkpoint's manifest lists it)") from None
        if st.st_size != entry["size"]:
            what = "truncated" if st.st_size < entry["size"] else "longer than saved"
            raise CheckpointError(f"{path}: {what}: {st.st_size} bytes, the manifest says {entry['size']}")
        key = (st.st_size, st.st_mtime_ns)
        with _lock:
            done = _verified.get(path) == key
        if _state["verify"] and not done:
            pending.append((path, entry, key))
    by_piece: dict[int, list[tuple[str, dict, tuple[int, int]]]] = {}
    for item in pending:
        by_piece.setdefault(item[1]["piece"], []).append(item)
    for piece, items in by_piece.items():
        digests = piece_digests([(path, key[0]) for path, _, key in items], piece)
        for (path, entry, key), got in zip(items, digests):
            want = entry["sha256"]
            bad = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), None)
            if bad is not None or len(got) != len(want):
                k = bad or 0
                where = f"bytes {k * piece}-{min((k + 1) * piece, key[0])}" if len(want) > 1 else "the file"
                raise CheckpointError(
                    f"{path}: content differs from what was saved in {where} (sha256 {got[k][:12]}..., manifest "
                    f"{want[k][:12]}...); the file is damaged"
                )
            with _lock:
                _verified[path] = key


def start_verifying(paths: list[str]) -> Future:
    """:func:`verify_files` in the background (its result raises the first problem); later checks of the same
    files find them verified."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(verify_files, paths)
    finally:
        pool.shutdown(wait=False)
