"""Checkpoints: atomic save, load at any TP/PP layout, bit-exact resume.

Layout of ``save_dir``::

    latest                      name of the newest complete checkpoint (written last, atomically)
    step_00000010/
      meta.json                 step, consumed samples, layout, roles, tokenizer hash, resolved config
      <role>/                   megatron-core dist_checkpointing (torch_dist) of that role's model
      ranks/tp{t}_pp{p}_dp{d}.pt  per-rank RNG states and optimizer state (ZeRO shard or dp 0's copy)

A save writes everything into ``step_N.tmp``, renames it to ``step_N`` and only then rewrites ``latest``; a save
killed at any point leaves the previous checkpoint complete and chosen. Model weights go through
dist_checkpointing, so they reshard on load (saved at TP2xPP2, loaded at TP1). Optimizer and RNG states are
per rank and need the same layout (exact resume).

Trust: loading never unpickles arbitrary objects (:mod:`mrlhf.safe_load`), ``meta.json`` lists a sha256 and size per
file that loading checks (:mod:`mrlhf.integrity`), and every damaged file or failed save is one
:class:`CheckpointError` naming the file, raised alike on every rank (a save that fails leaves ``latest`` as it was
and removes its partial files).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import time
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps

from mrlhf import integrity, safe_load
from mrlhf.errors import CheckpointError, MrlhfError, TrainingError
from mrlhf.parallel import comm
from mrlhf.testing_faults import maybe_fault

safe_load.install()  # every DCP read in this process goes through the restricted readers

LATEST = "latest"
META = "meta.json"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(root: str, dp_rank: int | None = None) -> str:
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp = ps.get_data_parallel_rank() if dp_rank is None else dp_rank
    return os.path.join(root, "ranks", f"tp{tp}_pp{pp}_dp{dp}.pt")


def layout_dict() -> dict[str, int]:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def rng_state() -> dict[str, Any]:
    """Every random stream of this rank: python, numpy, torch CPU, CUDA (all devices) and the TP-region streams."""
    from mrlhf.parallel import random as mp_random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "model_parallel": mp_random.get_states()}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from mrlhf.parallel import random as mp_random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "model_parallel" in state:  # checkpoints before 2026-12 have none
        mp_random.set_states(state["model_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(save_dir: str) -> str | None:
    """Directory of the newest complete checkpoint in ``save_dir``, or None."""
    tracker = os.path.join(save_dir, LATEST)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    if not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"{tracker} names '{name}' but {path}/{META} is missing (checkpoint incomplete)")
    return path


def read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"not a complete mrlhf checkpoint: {meta_path} is missing")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{meta_path}: damaged: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise CheckpointError(f"{meta_path}: damaged or truncated: {e.msg} at {where}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("roles", []), list):
        raise CheckpointError(f"{meta_path}: damaged: not an mrlhf checkpoint manifest")
    return meta


def save_checkpoint(
    save_dir: str,
    step: int,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, Any],
    train_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_hash: str,
    keep_last: int = 0,
    sharded_strategy: Any = None,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``sharded_strategy`` (one, or one
    per role) replaces megatron's default writer (conversions stream through ``convert.streaming.LazySaveStrategy``)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from mrlhf.children import tie_checkpoint_writer

    name = _step_name(step)
    final = os.path.join(save_dir, name)
    tmp = final + ".tmp"
    rank = torch.distributed.get_rank()
    _refuse_non_finite(models, step)
    tie_checkpoint_writer()
    # Each phase records its error instead of raising; _agree_on_save (the phase's barrier) makes every rank raise
    # the same one-line error, after rank 0 removed the partial files: an I/O error on one rank cannot leave the
    # others waiting, and never replaces 'latest'.
    error: BaseException | None = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            for entry in os.listdir(save_dir):  # leftovers of saves that were killed
                if entry.endswith(".tmp") and os.path.isdir(os.path.join(save_dir, entry)):
                    _remove_tree(os.path.join(save_dir, entry))
            os.makedirs(os.path.join(tmp, "ranks"))
            for role in models:
                os.makedirs(os.path.join(tmp, role))
        except OSError as e:
            error = e
    _agree_on_save(error, step, save_dir, name)
    try:
        for role, model in models.items():
            strategy = sharded_strategy.get(role) if isinstance(sharded_strategy, dict) else sharded_strategy
            dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, role), sharded_strategy=strategy)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        error = e
    _agree_on_save(error, step, save_dir, name)
    maybe_fault("save_after_model")
    try:
        # this rank's model shards are hashed while its optimizer state is written (both still in its page cache)
        shards = integrity.start_hashing(tmp, integrity.owned_shards(tmp, rank, sorted(models)))
        per_rank: dict[str, Any] = {"rng": rng_state()}
        for role, opt in optimizers.items():
            if opt.zero1 or ps.get_data_parallel_rank() == 0:
                per_rank[f"optimizer.{role}"] = opt.state_dict()
        torch.save(per_rank, _rank_file(tmp))
        maybe_fault("save_rank_state")
        own = integrity.hash_files(tmp, [os.path.relpath(_rank_file(tmp), tmp)])
        integrity.write_rank_hashes(tmp, rank, shards.result() | own)
    except Exception as e:  # ENOSPC shows up as RuntimeError from torch.save's zip writer
        error = e
    _agree_on_save(error, step, save_dir, name)
    if rank == 0:
        meta = {
            "format": 1,
            "step": step,
            "train_state": train_state,
            "roles": sorted(models),
            "layout": layout_dict(),
            "zero1": {role: bool(opt.zero1) for role, opt in optimizers.items()},
            "tokenizer_hash": tokenizer_hash,
            # which layers wrote each role's keys (TE names its fused norms differently; models/keymap.py)
            "transformer_impl": {r: getattr(getattr(m, "backbone", None), "transformer_impl", "local")
                                 for r, m in models.items()},  # fmt: skip
            "config": config,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            meta["files"] = integrity.collect_manifest(tmp, torch.distributed.get_world_size())
            _write_text_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1, default=str))
            if os.path.isdir(final):  # re-saving the same step: move the old one out of the way first
                _remove_tree(final)
            os.rename(tmp, final)
            maybe_fault("save_before_latest")
            _write_text_atomic(os.path.join(save_dir, LATEST), name)
        except OSError as e:
            error = e
        else:
            _apply_retention(save_dir, keep_last, keep=name)
    _agree_on_save(error, step, save_dir, name)
    return final


def _remove_tree(path: str) -> None:
    """``shutil.rmtree`` whose error names the whole path of what could not be removed (its own names only the entry,
    relative to the directory it was in: 'Permission denied: __0_0.distcp')."""

    def named(_func: Any, where: str, exc: Any) -> None:
        exc = exc[1] if isinstance(exc, tuple) else exc  # onerror passes sys.exc_info(), onexc the exception
        raise OSError(exc.errno, exc.strerror, where) from None

    shutil.rmtree(path, **({"onexc": named} if sys.version_info >= (3, 12) else {"onerror": named}))


def _rank_messages(message: str | None) -> list[str]:
    """Collective: every rank's ``message`` ('' = fine), in global rank order. How ranks agree on a failure only some
    of them saw (an I/O error, a damaged per-rank file), so that every rank raises the same, specific error line: a
    world-sized all-reduce of flags, then -- only when something failed -- of the UTF-8 bytes, one row per rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [message or ""]
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()

    def world_sum(t: torch.Tensor) -> torch.Tensor:
        comm.all_reduce_model_parallel(t)  # TP x PP, then DP: the whole world
        return comm.all_reduce_dp(t)

    flags = torch.zeros(world, dtype=torch.int32, device=comm.run_device())
    flags[rank] = int(bool(message))
    if not world_sum(flags).any():
        return [""] * world
    rows = torch.zeros(world, _MESSAGE_BYTES, dtype=torch.uint8, device=comm.run_device())
    data = (message or "").encode("utf-8")[:_MESSAGE_BYTES]
    if data:
        rows[rank, : len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=rows.device)
    return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in world_sum(rows).cpu().tolist()]


_MESSAGE_BYTES = 1024
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^'\"\n]+?)(?::\s*'([^']*)')?(?:$|[\n'\"])")


def _io_reason(error: BaseException, save_dir: str | None = None) -> tuple[int, str]:
    """(errno or a generic code, one readable line) of a save failure -- an OSError, torch's zip-writer RuntimeError,
    or a CheckpointException whose per-rank failures carry the writer processes' errors as text. C++ writers often
    lose the errno ('basic_ios::clear: iostream error'): a filesystem left with almost no space is then named."""
    if isinstance(error, OSError) and error.errno:
        where = f" ({error.filename})" if error.filename else ""
        return error.errno, f"{error.strerror}{where}"
    text = str(error)
    m = _ERRNO.search(text)
    if m:
        return int(m.group(1)), m.group(2).strip() + (f" ({m.group(3)})" if m.group(3) else "")
    if "unexpected pos" in text or "file write failed" in text:  # torch.save's zip writer on a full disk
        return errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (torch.save: {text.splitlines()[0][:120]})"
    failures = getattr(error, "failures", None) or {}
    for _, (exc, _tb) in sorted(failures.items()):
        return _io_reason(exc, save_dir)
    lines = text.strip().splitlines()
    generic = f"{type(error).__name__}: {lines[0] if lines else ''}"
    try:
        st = os.statvfs(save_dir) if save_dir else None
    except OSError:
        st = None
    if st is not None and st.f_bavail * st.f_frsize < 64 << 20:
        free = st.f_bavail * st.f_frsize / 2**20
        return errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free:.1f} MiB free under {save_dir}; writer: {generic})"
    return 1000, generic


def _agree_on_save(error: BaseException | None, step: int, save_dir: str, name: str) -> None:
    """Collective barrier of a save phase: when any rank failed, rank 0 removes this save's partial files (the
    ``.tmp`` directory, or a renamed one 'latest' does not name yet) and every rank raises the same CheckpointError.
    (A rank whose torch DCP write failed alongside the coordinator's only knows 'the write failed'; the coordinator,
    the lowest rank, carries the details, so the first non-empty reason is taken.)"""
    user = safe_load.user_error(error) if error is not None else None  # e.g. a damaged shard a conversion reads
    reason = str(user) if user is not None else _io_reason(error, save_dir)[1] if error is not None else None
    messages = _rank_messages(reason)
    failed = [r for r, m in enumerate(messages) if m]
    if not failed:
        return
    if torch.distributed.get_rank() == 0:
        final = os.path.join(save_dir, name)
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(save_dir, LATEST + ".tmp"))
        if _tracked(save_dir) != name:
            shutil.rmtree(final, ignore_errors=True)
    comm.barrier()  # the cleanup is done before anyone reports (or a supervisor restarts the job)
    if user is not None:  # already one line naming its file (an HF source or a checkpoint a conversion streams)
        raise user
    previous = _tracked(save_dir)
    keep = f"'latest' still names {previous}" if previous else "no earlier checkpoint exists"
    where = f" (rank {failed[0]})" if len(messages) > 1 else ""
    raise CheckpointError(
        f"cannot save checkpoint step {step} to {save_dir}{where}: {messages[failed[0]]}; {keep} and this save's "
        "partial files were removed"
    )


def _tracked(save_dir: str) -> str | None:
    tracker = os.path.join(save_dir, LATEST)
    try:
        with open(tracker, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _refuse_non_finite(models: dict[str, torch.nn.Module], step: int) -> None:
    """Collective: a model with NaN/inf weights is not saved (it would replace the last good checkpoint with a broken
    one). One fp32 sum per tensor on the device (times 0: NaN exactly when an element is NaN/inf, or the sum
    overflows, which finite weights of a working model never do), one host read per save; counted only if found."""
    probe = torch.zeros((), dtype=torch.float32, device=comm.run_device())
    params = [(role, n, p) for role, m in models.items() for n, p in m.named_parameters() if not p.is_meta]
    for _, _, p in params:
        probe += p.detach().sum(dtype=torch.float32).to(probe.device) * 0
    message = None
    if not torch.isfinite(probe).item():
        bad = [(role, n, int((~torch.isfinite(p.detach())).sum())) for role, n, p in params]
        count = sum(c for *_, c in bad)
        role, n, _ = next((b for b in bad if b[2]), bad[0])
        message = f"{count} NaN/inf values (first: '{role}' {n}" if count else f"weights too large to sum ('{role}' {n}"
    messages = _rank_messages(message)
    failed = [r for r, m in enumerate(messages) if m]
    if not failed:
        return
    where = f" on rank {failed[0]})" if len(messages) > 1 else ")"
    raise TrainingError(
        f"step {step}: refusing to save a checkpoint whose weights hold {messages[failed[0]]}{where}; training "
        "diverged -- the last good checkpoint stays 'latest'. Lower optimizer.lr, use training.precision=fp32 or "
        "check the data"
    )


def _apply_retention(save_dir: str, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted(e for e in os.listdir(save_dir) if e.startswith("step_") and not e.endswith(".tmp"))
    for old in steps[:-keep_last]:
        if old != keep:
            shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


# Which saved role can initialise which: an LM role from an LM role; a scalar role from a scalar role (head kept) or
# from an LM role (backbone only, new head).
SOURCES = {
    "actor": ("actor", "reference"),
    "reference": ("reference", "actor"),
    "reward": ("reward", "critic", "actor"),
    "critic": ("critic", "reward", "actor"),
}


def pick_source_role(path: str, role: str) -> str:
    roles = read_meta(path).get("roles", [])
    for candidate in SOURCES[role]:
        if candidate in roles:
            return candidate
    raise CheckpointError(f"checkpoint {path} holds {roles}; none can initialise a '{role}' model")


def load_model(path: str, role: str, model: torch.nn.Module, source_role: str | None = None) -> bool:
    """Load ``role``'s weights from ``source_role`` (default: best match) of a checkpoint saved at any TP/PP layout.

    Collective. Returns True when the head had no source (an LM checkpoint initialising a reward/critic model) and
    keeps its fresh initialisation; any other missing or unexpected key is an error that lists the keys.
    """
    from megatron.core import dist_checkpointing

    source_role = source_role or pick_source_role(path, role)
    role_dir = os.path.join(path, source_role)
    if not os.path.isdir(role_dir):
        raise CheckpointError(f"checkpoint {path} holds no '{source_role}' model (has: {read_meta(path).get('roles')})")
    sharded = model.sharded_state_dict()
    saved_impl = read_meta(path).get("transformer_impl", {}).get(source_role, "local")
    model_impl = getattr(getattr(model, "backbone", None), "transformer_impl", "local")
    if saved_impl != model_impl:  # a TE checkpoint into local layers or the other way round
        from mrlhf.models.keymap import rename_sharded_keys

        sharded = rename_sharded_keys(sharded, saved_impl, model_impl)
    new_head = source_role in ("actor", "reference") and getattr(model, "head", None) is not None
    if new_head:
        sharded = {k: v for k, v in sharded.items() if not k.startswith("head.")}
    from torch.distributed.checkpoint.api import CheckpointException

    _check_global_shapes(sharded, _check_role_dir(role_dir), role, role_dir)
    try:
        state = dist_checkpointing.load(sharded, role_dir)
    except MrlhfError:
        raise
    except CheckpointException as e:  # a BaseException: what a rank's reader raised, gathered on every rank
        raise _root_cause(e, f"cannot load '{role}' from {role_dir}") from None
    except Exception as e:  # megatron raises several types for key/shape mismatches
        raise CheckpointError(f"cannot load '{role}' from {role_dir}: {str(e).splitlines()[0]}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and not (new_head and k.startswith("head."))]
    if missing or unexpected:
        raise CheckpointError(f"'{role}' from {role_dir}: missing keys {missing}, unexpected keys {unexpected}")
    return new_head


def _check_global_shapes(sharded: dict, metadata: Any, role: str, role_dir: str) -> None:
    """Refuse a tensor whose global shape differs from the checkpoint's: DCP would read the overlapping corner of it
    and say nothing (a 512-row embedding silently became a 384-row one for a smaller tokenizer)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = metadata.state_dict_metadata
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or sh.key not in saved or getattr(saved[sh.key], "size", None) is None:
            continue
        theirs, ours = tuple(saved[sh.key].size), tuple(sh.global_shape)
        if theirs != ours:
            raise CheckpointError(
                f"cannot load '{role}' from {role_dir}: {sh.key} is {list(theirs)} in the checkpoint but {list(ours)} "
                "in this model (another vocabulary or model shape: check data.tokenizer_path, model.vocab_size and "
                "the model section against the checkpoint's meta.json)"
            )


def _check_role_dir(role_dir: str) -> Any:
    """The small files every rank reads first (megatron's ``metadata.json``, ``common.pt``, the DCP ``.metadata``
    and the shard sizes it implies), checked here so that their damage is a CheckpointError naming the file rather
    than an error from deep inside torch -- identical on every rank, since every rank reads the same files."""
    config = os.path.join(role_dir, "metadata.json")
    if not os.path.isfile(config):
        raise CheckpointError(f"{config}: file is missing (the role directory holds no complete dist checkpoint)")
    integrity.verify_file(config)
    try:
        with open(config, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config}: damaged or truncated ({e})") from None
    metadata = safe_load.read_dcp_metadata(role_dir)
    integrity.verify_file(os.path.join(role_dir, "common.pt"))
    return metadata


def _root_cause(e: BaseException, what: str) -> CheckpointError:
    """The CheckpointError a rank raised inside torch DCP (it comes back wrapped in a CheckpointException, the same
    on every rank), or one line for anything else."""
    user = safe_load.user_error(e)
    if user is not None:
        return CheckpointError(str(user))
    for _, (exc, _tb) in sorted(getattr(e, "failures", {}).items()):
        lines = str(exc).strip().splitlines()
        return CheckpointError(f"{what}: {type(exc).__name__}: {lines[0] if lines else ''}")
    return CheckpointError(f"{what}: {str(e).strip().splitlines()[0]}")


# Settings that do not change the math of a continued run: anything else differing on resume is refused.
NEUTRAL_KEYS = ("checkpoint.", "logging.", "parallel.backend", "parallel.timeout_minutes", "parallel.grad_bucket_mb",
                "training.output_dir", "training.eval_interval", "training.eval_samples",
                "training.max_consecutive_skips", "data.cache_dir", "data.eval_path", "dpo.offload_reference",
                "ppo.offload_frozen", "ppo.save_frozen_roles", "ppo.truncation_warn")  # fmt: skip


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key saved -> now`` for every setting that differs and changes the math of a continued run (schedule length,
    batch sizes, seed, model shape, optimizer, losses, data). Keys missing on either side (a field added since the
    save) are not compared."""
    now = json.loads(json.dumps(now, default=str))  # as meta.json stored it
    changes: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) & set(b)):
                walk(a[k], b[k], f"{prefix}{k}.")
            return
        key = prefix[:-1]
        if a != b and not key.startswith(NEUTRAL_KEYS):
            changes.append(f"{key} {a!r} -> {b!r}")

    walk(saved, now, "")
    return changes


def check_resume_config(path: str, meta: dict[str, Any], run_config: dict[str, Any], allow: bool) -> list[str]:
    """Refuse to continue a checkpoint with settings that change the run's math, naming each (one line), unless the
    user opted in (``checkpoint.allow_config_change=true``); returns the accepted changes."""
    changes = config_changes(meta.get("config") or {}, run_config)
    if changes and not allow:
        raise CheckpointError(
            f"{path}: this run's config differs from the checkpoint's: {'; '.join(changes)}. Resuming would continue "
            "it with other math (e.g. another LR schedule); rerun with the saved values, start a fresh run in another "
            "training.output_dir (checkpoint.load_dir to take its weights), or set checkpoint.allow_config_change=true"
        )
    return changes


def load_checkpoint(
    path: str,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, Any],
    tokenizer_hash: str | None,
    run_config: dict[str, Any] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Resume: weights, optimizer states and RNG of this rank. Returns the checkpoint's meta (train_state...).
    With ``run_config`` (the run's ``cfg.to_dict()``) a changed setting is refused (:func:`check_resume_config`)."""
    meta = read_meta(path)
    if tokenizer_hash is not None and meta.get("tokenizer_hash") != tokenizer_hash:
        raise CheckpointError(
            f"{path}: tokenizer hash {meta.get('tokenizer_hash')} differs from this run's tokenizer ({tokenizer_hash})"
        )
    saved, now = meta["layout"], layout_dict()
    if optimizers and saved != now:
        raise CheckpointError(
            f"{path} was saved at tp={saved['tp']} pp={saved['pp']} dp={saved['dp']}; exact resume needs the same "
            f"layout (this run: tp={now['tp']} pp={now['pp']} dp={now['dp']}). To start a new run from its weights "
            f"at this layout use checkpoint.load_dir={path} checkpoint.resume=false"
        )
    if run_config is not None:
        changes = check_resume_config(path, meta, run_config, allow_config_change)
        if changes and torch.distributed.get_rank() == 0:
            print(f"[mrlhf] warning: resuming {path} with changed settings (checkpoint.allow_config_change=true): "
                  + "; ".join(changes), flush=True)  # fmt: skip
    # this rank's state files are hashed while the weights load; _safe_load then finds them verified
    own = sorted({_rank_file(path), *(_rank_file(path, dp_rank=0) for o in optimizers.values() if not o.zero1)})
    checking = integrity.start_verifying([f for f in own if os.path.isfile(f)])
    for role, model in models.items():
        load_model(path, role, model, source_role=role)
    error: CheckpointError | None = None
    try:  # per-rank files: a damaged one is seen by its reader only, so the ranks agree before going on
        checking.result()
        per_rank = _safe_load(_rank_file(path))
        for role, opt in optimizers.items():
            # without ZeRO only dp rank 0 stored the (replicated) optimizer state: every dp rank reads that copy
            source = per_rank if opt.zero1 else _safe_load(_rank_file(path, dp_rank=0))
            key = f"optimizer.{role}"
            if key not in source:
                raise CheckpointError(
                    f"{path}: no optimizer state for '{role}' (saved with checkpoint.save_optimizer=false?)"
                )
            opt.load_state_dict(source[key])
        if not isinstance(per_rank.get("rng"), dict):
            raise CheckpointError(f"{_rank_file(path)}: damaged: holds no RNG states")
        set_rng_state(per_rank["rng"])
    except CheckpointError as e:
        error = e
    messages = _rank_messages(str(error) if error is not None else None)
    failed = [m for m in messages if m]
    if failed:
        raise CheckpointError(failed[0])
    return meta


def _safe_load(path: str) -> dict[str, Any]:
    """torch.load restricted to tensors, containers and the numpy types RNG states need (no arbitrary pickles)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"per-rank checkpoint state {path} is missing")
    state = safe_load.torch_load(path, map_location="cpu")  # integrity-checked, weights_only, errors name the file
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged: not a per-rank state dictionary")
    return state
