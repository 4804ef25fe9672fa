"""Checkpoint failures through the real commands: a damaged checkpoint is one line and exit 2; a full or read-only
disk, or a directory the trainer may not write into (EACCES), at save time is one line and exit 2 with 'latest' still
loadable; killing a trainer leaves no process behind; a torchrun layout error is printed once, the root cause exits 2
and no rank exits otherwise (torchrun may stop a slower rank with SIGTERM first)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from harness import run_ranks
from sft_runs import ROOT, TINY, overrides, sft_rank
from trust_runs import one_error_line, resume_rank, truncate

RUN = ["training.train_steps=4", "checkpoint.save_interval=2", "training.eval_samples=8"]
PY = sys.executable


def cli(*args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "mrlhf.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          **kw)  # fmt: skip


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """One process, 4 steps saved at 2 and 4, handed out as stopped at step 2."""
    base = tmp_path_factory.mktemp("trust_cli")
    run_ranks(sft_rank, 1, str(base / "run"), {}, RUN)
    ckpts = base / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")
    return base / "run"


@pytest.fixture
def run_dir(interrupted, tmp_path):
    shutil.copytree(interrupted, tmp_path / "run")
    return tmp_path / "run"


def test_damaged_checkpoint_is_one_line_and_exit_2(run_dir, tmp_path):
    ckpts = run_dir / "checkpoints"
    shard = ckpts / "step_00000002" / "actor" / "__0_0.distcp"
    truncate(str(shard))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+3? Just the number."}\n')
    gen = cli("generate", "--checkpoint", str(ckpts), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    inspect = subprocess.run([PY, "tools/inspect_checkpoint.py", str(ckpts)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    for proc, prefix in ((gen, "mrlhf: error:"), (inspect, "inspect_checkpoint: error:")):
        line = one_error_line(proc, prefix)
        assert f"{shard}: truncated" in line, line


def _in_tmpfs(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (user namespace where needed), where it may mount a tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("mount namespaces are not available here")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_full_or_read_only_disk_at_save_is_one_line_and_latest_stays_loadable(run_dir, tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    args = " ".join(overrides(str(run_dir), {}, RUN) + [f"checkpoint.save_dir={mnt}/ck"])
    train = f"{PY} -m mrlhf.cli sft --config {TINY} {args}"
    script = f"""
        mount -t tmpfs -o size=12m tmpfs {mnt} || exit 97
        cp -r {run_dir}/checkpoints {mnt}/ck
        dd if=/dev/zero of={mnt}/fill bs=64k 2>/dev/null
        {train} > {out}/enospc.out 2> {out}/enospc.err; echo $? > {out}/enospc.rc
        rm {mnt}/fill
        mount -o remount,ro {mnt} || exit 98
        {train} > {out}/erofs.out 2> {out}/erofs.err; echo $? > {out}/erofs.rc
        cp -r {mnt}/ck {out}/after
    """
    proc = _in_tmpfs(script, tmp_path)
    if proc.returncode in (97, 98):
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    for case, reason in (("enospc", "No space left on device"), ("erofs", "Read-only file system")):
        err = (out / f"{case}.err").read_text()
        fake = subprocess.CompletedProcess([], int((out / f"{case}.rc").read_text()), "", err)
        line = one_error_line(fake)
        assert reason in line and "cannot save checkpoint step 4" in line, line
        assert "'latest' still names step_00000002" in line, line
    after = out / "after"
    assert (after / "latest").read_text().strip() == "step_00000002"
    assert sorted(os.listdir(after)) == ["latest", "step_00000002"]  # the failed saves left nothing behind
    # and the kept checkpoint resumes (integrity-checked) once the disk is usable again
    resumed = run_ranks(resume_rank, 1, str(run_dir), RUN + [f"checkpoint.save_dir={after}"])
    assert len(resumed[0]["losses"]) == 2, resumed


# Runs a command under permission bits even as root (the tests' usual user, for whom chmod stops nothing): drops
# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the capability bounding set, then execs the command, which
# (still uid 0, still the owner of every file here) then has none of them. Without root it changes nothing.
WITHOUT_DAC_OVERRIDE = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            sys.exit(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _under_permission_bits(*cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", WITHOUT_DAC_OVERRIDE, *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _tree(path) -> list[tuple[str, int]]:
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(path) for f in fs)  # fmt: skip


@pytest.mark.parametrize("where", ["save_dir", "old step dir"])
def test_permission_denied_at_save_is_one_line_and_latest_stays_loadable(where, run_dir, tmp_path):
    """EACCES, from the kernel: save_dir not writable (the save cannot create step_4.tmp), or a step_4 left by an
    earlier run that 'latest' does not name and whose files cannot be removed (the save wrote step_4.tmp in full and
    fails replacing it)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    probe = _under_permission_bits(PY, "-c", f"open('{locked}/x', 'w')")
    locked.chmod(0o755)
    if probe.returncode == 0:
        pytest.skip("cannot make a directory unwritable for a child process here")
    assert "PermissionError" in probe.stderr, probe.stderr
    ckpts = run_dir / "checkpoints"
    if where == "save_dir":
        target = ckpts
    else:
        shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000004")
        target = ckpts / "step_00000004" / "actor"
    before = _tree(ckpts)
    target.chmod(0o555)
    try:
        proc = _under_permission_bits(PY, "-m", "mrlhf.cli", "sft", "--config", TINY, *overrides(str(run_dir), {}, RUN))
    finally:
        target.chmod(0o755)
    line = one_error_line(proc)
    assert "cannot save checkpoint step 4" in line and "Permission denied" in line, line
    assert "'latest' still names step_00000002 and this save's partial files were removed" in line, line
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    if where == "save_dir":
        assert f"({ckpts}/step_00000004.tmp)" in line, line
        assert _tree(ckpts) == before  # nothing written, nothing removed
        return
    assert f"({ckpts}/step_00000004/actor/" in line, line  # the file that could not be removed, by its whole path
    assert not [e for e in os.listdir(ckpts) if e.endswith(".tmp")]  # the save's own files are gone
    assert [f for f in _tree(ckpts) if f[0].startswith("step_00000002/")] == [
        f for f in before if f[0].startswith("step_00000002/")
    ]
    # and the kept checkpoint resumes (integrity-checked) and saves step 4 once the old one can be replaced
    resumed = run_ranks(resume_rank, 1, str(run_dir), RUN)
    assert len(resumed[0]["losses"]) == 2, resumed
    assert (ckpts / "latest").read_text().strip() == "step_00000004"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_trainer_leaves_no_process_behind(sig, tmp_path):
    out = tmp_path / "run"
    args = overrides(str(out), {}, ["training.train_steps=100000", "checkpoint.save_interval=1",
                                     "checkpoint.keep_last=1", "training.eval_samples=8"])  # fmt: skip
    trainer = subprocess.Popen([PY, "-m", "mrlhf.cli", "sft", "--config", TINY, *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "latest").exists():  # megatron's writer helpers start at the first save
            assert trainer.poll() is None and time.monotonic() < deadline, "trainer ended before its first save"
            time.sleep(0.2)
        children = psutil.Process(trainer.pid).children(recursive=True)
        assert children, "expected the checkpoint writer's helper processes"
        os.kill(trainer.pid, sig)
        trainer.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if trainer.poll() is None:
            trainer.kill()


@pytest.mark.parametrize(
    "nproc, extra, text",
    [(3, ["parallel.tp=2"], "world size 3 is not divisible by parallel.tp*parallel.pp = 2"),
     (2, ["training.global_batch_size=6", "training.micro_batch_size=2"], "must be a multiple of dp (2)")],
)  # fmt: skip
def test_torchrun_layout_error_is_printed_once_and_ranks_exit_2(nproc, extra, text, tmp_path):
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    proc = subprocess.run([torchrun, "--nproc-per-node", str(nproc), "-m", "mrlhf.cli", "sft", "--config", TINY,
                           f"training.output_dir={tmp_path}", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "mrlhf: error:" in line]
    assert len(errors) == 1 and text in errors[0], output[-3000:]
    # torchrun's summary lists every rank's code. A rank that had not yet exited when torchrun saw the first failure is
    # SIGTERMed by torchrun itself (-15), so "every rank exits 2" is only observable as: the root cause is exit 2, and
    # every other rank either exited 2 on its own or was stopped by torchrun -- none crashed, hung or exited otherwise.
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", output, re.M)
    assert len(codes) == nproc, output[-3000:]
    assert set(codes) <= {"2", "-15"} and "2" in codes, output[-3000:]
    root = output.split("Root Cause", 1)[1]
    assert re.search(r"exitcode\s*:\s*2 ", root), output[-3000:]
