"""The conversion tools meet a damaged or hostile checkpoint like the trainers do, through their real command lines:
one error line naming the file and what is wrong, exit code 2, no traceback, the output directory left as it was and
a planted payload never run. Export and reshard read tensors in a forked child, inside torch DCP (reshard even inside
DCP's save of the target); inspect verifies every file of the manifest before it reads the metadata."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from harness import run_ranks
from sft_runs import ROOT, sft_rank
from trust_runs import flip_byte, one_error_line, plant, truncate

STEP = "step_00000002"
TOOLS = {
    "export": ("tools/convert_mrlhf_to_hf.py", "convert_mrlhf_to_hf: error:"),
    "reshard": ("tools/reshard.py", "reshard: error:"),
    "inspect": ("tools/inspect_checkpoint.py", "inspect_checkpoint: error:"),
}
DAMAGE = {  # case: (file under the step directory, damage, what the line says after the file's path)
    "flipped shard": ("actor/__0_0.distcp", flip_byte, "content differs from what was saved"),
    "truncated shard": ("actor/__0_0.distcp", truncate, "truncated"),
    "missing shard": ("actor/__0_1.distcp", os.remove, "missing"),
    "truncated .metadata": ("actor/.metadata", truncate, "truncated"),
    "planted .metadata": ("actor/.metadata", None, "refused to unpickle 'posix.system'"),
}
# Every damage through export (the deepest path: tensors read in a forked child inside torch DCP); reshard and inspect
# each meet a planted payload (no entry point may run one) and damages that reach their own code: reshard's DCP save
# of the target (a flipped shard, a truncated .metadata), inspect's manifest check (a truncated and a missing shard).
# The other four tool x damage pairs run the same reader code as these (all 15 passed before the cut; 75 s -> 55 s).
CASES = [(case, "export") for case in DAMAGE] + [
    ("planted .metadata", "reshard"), ("flipped shard", "reshard"), ("truncated .metadata", "reshard"),
    ("planted .metadata", "inspect"), ("truncated shard", "inspect"), ("missing shard", "inspect"),
]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One process, 2 steps, one checkpoint (tp1: shards __0_0 and __0_1 of the actor)."""
    run = tmp_path_factory.mktemp("trust_convert") / "run"
    run_ranks(sft_rank, 1, str(run), {}, ["training.train_steps=2", "checkpoint.save_interval=2",
                                          "training.eval_samples=8"])  # fmt: skip
    return run / "checkpoints"


@pytest.mark.parametrize("case, tool", CASES, ids=[f"{c}-{t}" for c, t in CASES])
def test_damaged_checkpoint_is_one_line_exit_2_and_no_output(case, tool, saved, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(saved, ckpts)
    rel, damage, what = DAMAGE[case]
    path = ckpts / STEP / rel
    marker = tmp_path / "PWNED"
    if damage is None:
        plant(str(ckpts / STEP), "metadata", str(marker))
    else:
        damage(str(path))
    script, prefix = TOOLS[tool]
    args = [str(ckpts)]
    if tool == "export":  # an output directory whose parent does not exist yet: both must stay absent
        out = tmp_path / "new" / "hf"
        args = ["--ckpt", str(ckpts), "--out", str(out)]
    elif tool == "reshard":  # an existing empty output directory: it must stay empty, with nothing beside it
        out = tmp_path / "tp2"
        out.mkdir()
        args = ["--ckpt", str(ckpts), "--out", str(out), "--tp", "2", "--pp", "1"]
    before = sorted(os.listdir(tmp_path))
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_error_line(proc, prefix)
    assert f"{path}: " in line and what in line.split(f"{path}: ", 1)[1], line
    assert sorted(os.listdir(tmp_path)) == before, "a failed conversion left files next to its output"
    if tool == "reshard":
        assert os.listdir(out) == []
    assert not marker.exists(), "a planted payload ran"
