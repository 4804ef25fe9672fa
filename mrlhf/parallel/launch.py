"""Which process am I: torchrun's variables, or Slurm's when ``srun`` started one task per GPU.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; those always win. Under
``srun`` (no torchrun) each task has ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and the step's node list;
:func:`apply_launcher_env` turns them into torch's variables once, at start-up, so everything after it (the layout
check, ``init_process_group``, the one-error-line rule of the CLI) reads one convention. The rendezvous host is the
first node of the step, the port a function of the job id (every task computes the same one without talking).

A shell inside an allocation (``salloc``, or the batch script itself) also has ``SLURM_PROCID`` and ``SLURM_NTASKS``
but is not one of N tasks: treating it as rank 0 of N would wait for N-1 peers that never come. Only a task of a
numbered job step (``SLURM_STEP_ID`` a step number, which srun sets and the batch/extern/interactive steps do not
carry as one) is read as a rank. ``MRLHF_LAUNCHER=none`` turns the Slurm reading off (a cluster whose
shells do carry a step number).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

from mrlhf.errors import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

PORT_BASE, PORT_SPAN = 15000, 15000
"""MASTER_PORT under srun: ``PORT_BASE + job_id % PORT_SPAN``, below Linux's ephemeral range (32768-60999), so an
outgoing connection cannot already hold it; two jobs sharing a first node rarely collide; set MASTER_PORT to choose."""

_SPECIAL_STEPS = 0xFFFFFFF0
"""Slurm's pseudo steps (batch, extern, interactive, pending) have ids from here up; srun's steps are 0, 1, 2, ..."""


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list -> host names: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1.
    Several bracket groups in one name multiply out (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2); zero padding is kept."""
    hosts: list[str] = []
    for item in _split_top_level(spec.strip()):
        hosts.extend(_expand_item(item, spec))
    if not hosts:
        raise ConfigError(f"Slurm node list {spec!r} names no host")
    return hosts


def _split_top_level(spec: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, c in enumerate(spec):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return [s for s in items if s]


def _expand_item(item: str, spec: str) -> list[str]:
    m = re.match(r"^([^\[\]]*)\[([^\[\]]*)\](.*)$", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ConfigError(f"Slurm node list {spec!r}: unbalanced brackets in {item!r}")
        return [item]
    prefix, ranges, rest = m.groups()
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ConfigError(f"Slurm node list {spec!r}: {part!r} in {item!r} is not a number or a range a-b")
        width = len(lo)
        first, last = int(lo), int(hi) if hi else int(lo)
        if last < first:
            raise ConfigError(f"Slurm node list {spec!r}: range {part!r} runs backwards")
        names.extend(f"{prefix}{i:0{width}d}" for i in range(first, last + 1))
    return [n + tail for n in names for tail in _expand_item(rest, spec)] if rest else names


def in_srun_task(environ: Mapping[str, str]) -> bool:
    """True for a task that srun started (a numbered job step with a task id), not a shell in an allocation."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < _SPECIAL_STEPS and "SLURM_PROCID" in environ


def slurm_torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch's launcher variables for this srun task (empty when not one). Raises ConfigError naming the variable
    when Slurm's own are inconsistent (a task id outside the step's task count)."""
    if not in_srun_task(environ):
        return {}

    def number(name: str, *fallbacks: str) -> int:
        for key in (name, *fallbacks):
            value = environ.get(key)
            if value is not None:
                if not value.isdigit():
                    raise ConfigError(f"Slurm variable {key}={value!r} is not a whole number")
                return int(value)
        raise ConfigError(f"srun task without {name}: cannot tell this process's place in the job")

    world = number("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    rank = number("SLURM_PROCID")
    local = number("SLURM_LOCALID")
    if not 0 <= rank < world:
        raise ConfigError(f"SLURM_PROCID={rank} is outside the step's {world} tasks")
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodes:
        raise ConfigError("srun task without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: no host to meet at")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
           "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_hostlist(nodes)[0]}  # fmt: skip
    per_node = _tasks_on_this_node(environ)
    if per_node is not None:
        env["LOCAL_WORLD_SIZE"] = str(per_node)
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "0"
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(PORT_BASE + int(job) % PORT_SPAN if job.isdigit() else PORT_BASE)
    return env


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """``SLURM_STEP_TASKS_PER_NODE`` (``8(x4)`` or ``8,8,4``) at this task's node index, when Slurm says it."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = environ.get("SLURM_NODEID")
    if not spec or node is None or not node.isdigit():
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[int(node)] if int(node) < len(counts) else None


def apply_launcher_env(environ: MutableMapping[str, str] | None = None) -> str:
    """Fill torch's variables from Slurm's for an srun task (torchrun's, when present, are kept). Returns the
    launcher seen: 'torchrun', 'srun' or 'none'."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return "torchrun"
    if environ.get("MRLHF_LAUNCHER", "") == "none":
        return "none"
    env = slurm_torch_env(environ)
    if not env:
        return "none"
    environ.update(env)
    return "srun"


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device this rank drives. With one GPU per task bound by Slurm (``--gpus-per-task=1`` or
    ``--gpu-bind``), each task sees exactly one device whatever its local rank; otherwise the local rank picks it."""
    if visible_devices < 1:
        raise ConfigError("parallel.backend=nccl but this process sees no CUDA device (CUDA_VISIBLE_DEVICES?)")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this process sees {visible_devices} CUDA devices: start at most one task per "
            f"GPU on each node (srun --ntasks-per-node, torchrun --nproc-per-node)"
        )
    return local_rank
