"""Process groups: the one call to megatron-core's ``initialize_model_parallel``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mrlhf.config import RunConfig
from mrlhf.parallel.compat import apply_cpu_compat, cuda_available
from mrlhf.parallel.topology import Coord, Layout


@dataclass
class ParallelContext:
    """This rank's place in the layout and the device it computes on."""

    layout: Layout
    rank: int
    coord: Coord
    device: torch.device

    @property
    def tp_rank(self) -> int:
        return self.coord.tp_rank

    @property
    def pp_rank(self) -> int:
        return self.coord.pp_rank

    @property
    def dp_rank(self) -> int:
        return self.coord.dp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp_rank == self.layout.pp - 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and the progress bar."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig, stage: str = "") -> ParallelContext:
    """Create (or reuse) the default process group and megatron's TP/PP/DP groups for ``cfg.parallel``.

    Under torchrun the usual RANK/WORLD_SIZE/MASTER_* variables are read (under srun the CLI derived them from
    Slurm's, ``parallel/launch.py``); a plain ``python`` run is world 1.
    """
    from megatron.core import parallel_state

    apply_cpu_compat()
    p = cfg.parallel
    backend = p.backend if p.backend != "auto" else ("nccl" if cuda_available() else "gloo")
    if backend == "nccl" and not cuda_available():
        from mrlhf.errors import ConfigError

        raise ConfigError("parallel.backend=nccl needs CUDA; use gloo or auto on this machine")
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:  # a layout error before any process group exists
        cfg.validate_world(int(os.environ["WORLD_SIZE"]), stage)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            from mrlhf.parallel.launch import local_device_index

            torch.cuda.set_device(local_device_index(local_rank, torch.cuda.device_count()))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=p.timeout_minutes))
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg.validate_world(world, stage)
    layout = Layout.for_world(world, p.tp, p.pp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        distributed_timeout_minutes=p.timeout_minutes,
        create_gloo_process_groups=False,
    )
    coord = layout.coord(rank)
    # Our pure topology must agree with megatron's group construction; fail loudly if an upgrade changes it.
    assert parallel_state.get_tensor_model_parallel_rank() == coord.tp_rank
    assert parallel_state.get_pipeline_model_parallel_rank() == coord.pp_rank
    assert parallel_state.get_data_parallel_rank() == coord.dp_rank
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    from mrlhf.parallel import comm

    comm.set_run_device(device)
    return ParallelContext(layout=layout, rank=rank, coord=coord, device=device)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default group (end of a run or test)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    from mrlhf.parallel import comm

    comm.set_run_device(None)
