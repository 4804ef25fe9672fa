"""Every collective goes through mrlhf.parallel.comm, on tensors on the run's device (NCCL takes no CPU tensors)."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mrlhf"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp", "monitored_barrier",
}  # fmt: skip


def direct_collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of torch.distributed collectives used in ``source``, however torch.distributed is imported."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in imported:
            found.append((node.lineno, node.id))
    return found


def test_the_scanner_sees_every_import_style():
    src = "import torch.distributed as dist\nimport torch\nfrom torch.distributed import all_reduce as ar\n"
    src += "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nar(x)\ndist.get_rank()\n"
    assert sorted(direct_collective_calls(src)) == [(4, "all_reduce"), (5, "broadcast"), (6, "ar")]


def test_no_module_but_comm_calls_collectives():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "parallel/comm.py":
            continue
        for line, name in direct_collective_calls(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name}")
    assert not offenders, "collectives outside mrlhf/parallel/comm.py:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "call",
    ["all_reduce_dp", "all_reduce_tp", "all_reduce_pp", "all_reduce_model_parallel", "broadcast_from_last_stage",
     "all_gather_tp", "isend_next_stage", "irecv_prev_stage", "sum_tp_differentiable"],
)  # fmt: skip
def test_collectives_refuse_tensors_off_the_run_device(call):
    """Checked before any group size test, so a one-GPU run (every collective a no-op) still finds a CPU tensor."""
    from mrlhf.parallel import comm

    comm.set_run_device(torch.device("meta"))  # stands in for cuda: any type other than the tensor's
    try:
        with pytest.raises(RuntimeError, match=rf"comm.{call}: got a tensor on cpu.*device=ctx.device"):
            getattr(comm, call)(torch.zeros(2))
        assert comm.run_device().type == "meta"
    finally:
        comm.set_run_device(None)
    assert comm.run_device() == torch.device("cpu")


def test_p2p_refuses_buffers_off_the_run_device():
    from mrlhf.parallel import comm

    comm.set_run_device(torch.device("meta"))
    try:
        with pytest.raises(RuntimeError, match="p2p send"):
            comm.send_forward(torch.zeros(2))
        with pytest.raises(RuntimeError, match="p2p receive"):
            comm.recv_forward((torch.Size([2]), torch.float32, torch.device("cpu")))
    finally:
        comm.set_run_device(None)
