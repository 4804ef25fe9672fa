"""Rank functions and checkpoint tampering helpers of the checkpoint-trust tests (module level: forked ranks run them).

A rank function returns ``{"error": line}`` for a user-facing error (what the CLI would print) instead of raising,
so the test sees every rank's line."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess

import torch
from sft_runs import TINY, overrides, sft_rank


class Payload:
    """A hostile pickle: unpickling it runs a shell command (creating a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_error_line(proc: subprocess.CompletedProcess, prefix: str = "mrlhf: error:") -> str:
    """The one line a failed command printed (exit code 2, no traceback, nothing else on stderr)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    return lines[0]


def _guard(fn, *args) -> dict:
    from mrlhf.errors import MrlhfError

    try:
        return fn(*args)
    except MrlhfError as e:
        return {"error": str(e), "kind": type(e).__name__}


def resume_rank(rank: int, out: str, extra: list[str], verify: bool = True) -> dict:
    """Train in ``out`` (resuming from its newest checkpoint); the losses of the steps run, or the error."""
    from mrlhf import integrity

    integrity.set_verify(verify)

    return _guard(sft_rank, rank, out, {}, extra)


def load_dir_rank(rank: int, out: str, src: str) -> dict:
    """A new run initialised from ``src`` (``checkpoint.load_dir``), one step."""
    return resume_rank(rank, out, [f"checkpoint.load_dir={src}", "checkpoint.resume=false", "training.train_steps=1",
                                   "checkpoint.enabled=false"])  # fmt: skip


def generate_rank(rank: int, src: str) -> dict:
    """What ``mrlhf generate --checkpoint src`` loads: the actor."""

    def run():
        from mrlhf.config import load_config
        from mrlhf.data.tokenizer import Tokenizer
        from mrlhf.generation.run import load_actor
        from mrlhf.parallel.state import init_distributed

        cfg = load_config(TINY, overrides("/tmp/unused", {}, []))
        ctx = init_distributed(cfg, "generate")
        load_actor(cfg, ctx, src, Tokenizer.load(cfg.data.tokenizer_path))
        return {"ok": True}

    return _guard(run)


def save_non_finite_rank(rank: int, save_dir: str, bad_rank: int) -> dict:
    """Save a model with one NaN weight on ``bad_rank``: refused on every rank, nothing written."""

    def run():
        from mrlhf import checkpoint as ckpt
        from mrlhf.config import load_config
        from mrlhf.models.roles import build_role
        from mrlhf.parallel.state import init_distributed

        cfg = load_config(TINY, overrides("/tmp/unused", {}, []))
        init_distributed(cfg)
        model = build_role(cfg, "actor", 512)
        if rank == bad_rank:
            with torch.no_grad():
                next(model.parameters()).view(-1)[3] = float("nan")
        ckpt.save_checkpoint(save_dir, 9, {"actor": model}, {}, {"step": 9}, cfg.to_dict(), "h")
        return {"ok": True}

    return _guard(run)


# ----------------------------------------------------------------------------------------------------------------------
# What an attacker (or a disk) does to a checkpoint directory


def rehash(step_dir: str) -> None:
    """Rewrite the manifest for the files as they are now (an attacker can; hashes catch damage, not forgery)."""
    from mrlhf import integrity

    meta_path = os.path.join(step_dir, "meta.json")
    meta = json.load(open(meta_path))
    meta["files"] = integrity.hash_files(step_dir, sorted(meta["files"]))
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def plant(step_dir: str, where: str, marker: str) -> str:
    """Put a pickle payload into one of the files loading unpickles; returns that file's path."""
    role = os.path.join(step_dir, "actor")
    if where == "metadata":
        path = os.path.join(role, ".metadata")
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)
    elif where == "common":
        path = os.path.join(role, "common.pt")
        torch.save(Payload(marker), path)
    elif where == "ranks":
        path = os.path.join(step_dir, "ranks", "tp0_pp0_dp0.pt")
        from mrlhf.safe_load import torch_load

        state = torch_load(path)  # the checkpoint's own rank state, read the safe way
        state["rng"]["python"] = Payload(marker)
        torch.save(state, path)
    elif where == "bytes_item":
        path = _plant_bytes_item(role, marker)
    else:
        raise ValueError(where)
    rehash(step_dir)
    return path


def _plant_bytes_item(role: str, marker: str) -> str:
    """Replace one byte item inside a .distcp shard (megatron's ``_extra_state`` objects) with a torch.save'd payload,
    fixing the offsets in .metadata as a careful attacker would."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md_path = os.path.join(role, ".metadata")
    md = pickle.load(open(md_path, "rb"))  # our own test checkpoint: trusted here
    index, info = next((k, v) for k, v in md.storage_data.items()
                       if isinstance(md.state_dict_metadata.get(k.fqn), BytesStorageMetadata))  # fmt: skip
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    payload = buf.getvalue()
    shard = os.path.join(role, info.relative_path)
    data = open(shard, "rb").read()
    data = data[: info.offset] + payload + data[info.offset + info.length :]
    delta = len(payload) - info.length
    for other in md.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            other.offset += delta
    info.length = len(payload)
    open(shard, "wb").write(data)
    pickle.dump(md, open(md_path, "wb"))
    return shard


def flip_byte(path: str, at: float = 0.7) -> None:
    b = bytearray(open(path, "rb").read())
    b[int(len(b) * at)] ^= 0xFF
    open(path, "wb").write(b)


def truncate(path: str, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def ppo_guarded(rank: int, out: str, extra: list[str]) -> dict:
    """A PPO run (random roles, a few tokens) that saves; its records or the error."""
    from ppo_runs import ppo_rank

    return _guard(lambda: {"records": ppo_rank(rank, out, {}, extra)["records"]})
