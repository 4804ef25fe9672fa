"""The Slurm launch path end to end on CPU: ``scripts/run_sft_13b.sh`` inside a (pretend) job, with a stand-in
``srun`` that starts the tasks locally with the variables real srun gives each task (and nothing of torchrun's), runs
a tiny SFT at DP2 whose metrics equal the same run under torchrun exactly; a layout error stops the job before srun
with one line; --dry-run prints the plan and the srun line."""

import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from sft_runs import ROOT

FAKE_SRUN = r'''#!PYTHON
"""srun's task start-up, locally: --nodes / --ntasks-per-node tasks with SLURM_PROCID, SLURM_LOCALID, the step's
task count and node list; --kill-on-bad-exit stops the rest when one fails."""
import os, subprocess, sys, time
args, nodes, per_node, kill = sys.argv[1:], 1, 1, False
while args and args[0].startswith("--"):
    opt = args.pop(0)
    if opt.startswith("--nodes="): nodes = int(opt.split("=", 1)[1])
    elif opt.startswith("--ntasks-per-node="): per_node = int(opt.split("=", 1)[1])
    elif opt == "--kill-on-bad-exit=1": kill = True
world = nodes * per_node
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
procs = []
for rank in range(world):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_NODEID=str(rank // per_node), SLURM_STEP_NUM_TASKS=str(world), SLURM_NTASKS=str(world),
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})")
    procs.append(subprocess.Popen(args, env=env))
codes = [None] * world
while any(c is None for c in codes):
    for i, p in enumerate(procs):
        if codes[i] is None:
            codes[i] = p.poll()
            if codes[i] not in (None, 0) and kill:
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
    time.sleep(0.1)
sys.exit(next((c for c in codes if c), 0))
'''

COMMON = ["training.train_steps=3", "training.global_batch_size=8", "training.micro_batch_size=2",
          "training.eval_interval=0", "data.cache_dir=null", "logging.progress_bar=false", "logging.log_interval=1",
          "checkpoint.enabled=false",
          "parallel.backend=gloo"]  # fmt: skip


def job_env(tmp_path: Path, **more: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.replace("PYTHON", sys.executable))
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_"))}  # fmt: skip
    for var in ("SFT_DATA", "SFT_EVAL", "TOKENIZER", "INIT"):
        env.pop(var, None)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", MRLHF_PYTHON=sys.executable, CONFIG="configs/sft_tiny.yaml",
               SLURM_JOB_ID=str(random.randint(10000, 99999)), SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2(x1)",
               SLURM_SUBMIT_DIR=ROOT, FAKE_SRUN_LOG=str(tmp_path / "srun.log"), PYTHONWARNINGS="ignore", **more)  # fmt: skip
    return env


def losses(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if not k.endswith(("_time_s", "_per_s"))}
            for r in rows]  # fmt: skip


def test_sft_under_the_slurm_script_equals_torchrun(tmp_path):
    out = tmp_path / "slurm"
    job = subprocess.run(["bash", "scripts/run_sft_13b.sh", *COMMON, f"training.output_dir={out}"], cwd=ROOT,
                         env=job_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "mrlhf plan: sft on 2 GPUs (tp=1 pp=1 dp=2)" in job.stdout, job.stdout
    logged = job.stdout + job.stderr
    assert "layout tp=1 pp=1 dp=2" in logged, logged[-3000:]  # the two tasks formed one job, not two world-1 runs
    (srun_line,) = (tmp_path / "srun.log").read_text().splitlines()
    assert "--nodes=1 --ntasks-per-node=2 --kill-on-bad-exit=1" in srun_line and " sft --config " in srun_line
    ref = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    tr = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                         str(random.randint(30000, 39999)), "-m", "mrlhf.cli", "sft", "--config",
                         "configs/sft_tiny.yaml", *COMMON, f"training.output_dir={ref}"],
                        cwd=ROOT, env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert tr.returncode == 0, tr.stderr[-3000:]
    got, want = losses(out), losses(ref)
    assert len(got) == len(want) == 3 and all("loss" in r for r in got), (got, want)
    assert got == want


def test_a_layout_error_stops_the_job_before_srun_with_one_line(tmp_path):
    job = subprocess.run(["bash", "scripts/run_sft_13b.sh", *COMMON, "training.global_batch_size=6",
                          f"training.output_dir={tmp_path / 'out'}"], cwd=ROOT, env=job_env(tmp_path),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert job.returncode == 2, (job.stdout, job.stderr)
    lines = [line for line in job.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mrlhf: error:"), job.stderr
    assert "training.global_batch_size (6)" in lines[0] and "dp (2)" in lines[0], lines[0]
    assert not (tmp_path / "srun.log").exists()  # no task was started


def test_dry_run_prints_the_plan_and_the_srun_line_without_slurm(tmp_path):
    env = job_env(tmp_path)
    for var in [k for k in env if k.startswith("SLURM_")]:
        del env[var]
    env.pop("CONFIG")
    dry = subprocess.run(["bash", "scripts/run_ppo_13b.sh", "--dry-run"], cwd=ROOT, env={**env, "NODES": "4"},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "[ppo] 4 nodes x 8 GPUs = 32 processes" in dry.stdout
    assert "mrlhf plan: ppo on 32 GPUs (tp=8 pp=2 dp=2), bf16; GiB per GPU" in dry.stdout, dry.stdout
    assert "would run: srun --nodes=4 --ntasks-per-node=8 --kill-on-bad-exit=1" in dry.stdout
    assert not (tmp_path / "srun.log").exists()
    # outside a job, without --dry-run and without sbatch: one line, exit 2 (a PATH with only what the script uses)
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "basename"):
        (tools / tool).symlink_to(shutil.which(tool))
    bare = subprocess.run([shutil.which("bash"), "scripts/run_ppo_13b.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**env, "PATH": str(tools)})  # fmt: skip
    assert bare.returncode == 2 and "no sbatch here" in bare.stderr, (bare.returncode, bare.stderr)
    bad = subprocess.run(["bash", "scripts/run_ppo_13b.sh", "--dry-run", "nonsense"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown argument 'nonsense'" in bad.stderr, bad.stderr


FAKE_SBATCH = """#!/bin/sh
# records how it was called (cwd, arguments), one per line
{ pwd; for a in "$@"; do echo "$a"; done; } > "$FAKE_SBATCH_LOG"
"""


def test_self_submission_from_another_directory_and_the_spooled_copy_find_the_repository(tmp_path):
    """`bash /path/to/run_ppo_13b.sh` outside a job submits that same script by its absolute path (sbatch runs where
    it was called, not in the repository), exporting MRLHF_HOME; the copy sbatch then runs from its spool directory
    finds the launcher through MRLHF_HOME -- even with SLURM_SUBMIT_DIR elsewhere."""
    env = job_env(tmp_path)
    for var in [k for k in env if k.startswith("SLURM_")]:
        del env[var]
    env.pop("CONFIG")
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = os.path.join(ROOT, "scripts", "run_ppo_13b.sh")
    rel = os.path.relpath(script, elsewhere)
    log = tmp_path / "sbatch.log"
    done = subprocess.run(["bash", rel, "ppo.kl_coef=0.02"], cwd=elsewhere, capture_output=True,
                          text=True, timeout=60, env={**env, "FAKE_SBATCH_LOG": str(log),
                                                       "PROMPTS": "/data/my prompts.jsonl"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    cwd, *args = log.read_text().splitlines()
    assert cwd == ROOT  # the launcher had moved to the repository before submitting
    assert args[0] == f"--export=ALL,MRLHF_HOME={ROOT}" and args[1] == script and os.path.isabs(args[1])
    assert args[2:] == ["ppo.kl_coef=0.02"]
    # the job: sbatch's spooled copy, run with the job's variables; dry-run prints what srun would start
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(script, spool / "slurm_script")
    job = {**env, "MRLHF_HOME": ROOT, "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(elsewhere),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12",
           "PROMPTS": "/data/my prompts.jsonl"}  # fmt: skip
    ran = subprocess.run(["bash", str(spool / "slurm_script"), "--dry-run"], cwd=spool, capture_output=True,
                         text=True, timeout=120, env=job)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "--cpus-per-task=12" in ran.stdout  # passed on: srun no longer inherits it (Slurm >= 22.05)
    assert "data.train_path=/data/my prompts.jsonl" in ran.stdout  # one override, its space kept
