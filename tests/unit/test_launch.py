"""Slurm launch conventions (``mrlhf/parallel/launch.py``): host lists, which process is a rank, torch's variables
from Slurm's, the CUDA device a task drives."""

import pytest

from mrlhf.errors import ConfigError
from mrlhf.parallel.launch import (
    PORT_BASE,
    PORT_SPAN,
    apply_launcher_env,
    expand_hostlist,
    in_srun_task,
    local_device_index,
    slurm_torch_env,
)


@pytest.mark.parametrize(
    "spec,hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),  # padding is the width of the low end
        ("a[1-2],login-3,b[5]", ["a1", "a2", "login-3", "b5"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("dgx-[1,3]-ib", ["dgx-1-ib", "dgx-3-ib"]),
        ("127.0.0.1", ["127.0.0.1"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec,word", [("gpu[1-", "unbalanced"), ("gpu[a-b]", "not a number"),
                                       ("gpu[5-2]", "backwards"), ("", "names no host")])  # fmt: skip
def test_bad_hostlists_are_named(spec, word):
    with pytest.raises(ConfigError, match=word) as e:
        expand_hostlist(spec)
    assert repr(spec) in str(e.value)


def srun_task(rank: int, world: int = 16, local: int | None = None, **more: str) -> dict[str, str]:
    """What srun gives task ``rank`` of a 2-node, 8-tasks-per-node step of job 4242."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
           "SLURM_STEP_NUM_TASKS": str(world), "SLURM_LOCALID": str(rank % 8 if local is None else local),
           "SLURM_NODEID": str(rank // 8), "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}  # fmt: skip
    env.update(more)
    return env


def test_srun_task_becomes_torch_variables():
    env = slurm_torch_env(srun_task(11))
    port = str(PORT_BASE + 4242 % PORT_SPAN)
    assert 1024 <= PORT_BASE and PORT_BASE + PORT_SPAN <= 32768  # below Linux's ephemeral ports
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": port}  # fmt: skip
    # every task of the step agrees on the rendezvous
    assert {(slurm_torch_env(srun_task(r))["MASTER_ADDR"], slurm_torch_env(srun_task(r))["MASTER_PORT"])
            for r in range(16)} == {("gpu07", port)}  # fmt: skip
    # uneven tasks per node: this node's own count
    assert slurm_torch_env(srun_task(9, SLURM_STEP_TASKS_PER_NODE="8,4"))["LOCAL_WORLD_SIZE"] == "4"
    # the user's MASTER_ADDR / MASTER_PORT win
    chosen = slurm_torch_env(srun_task(0, MASTER_ADDR="10.0.0.5", MASTER_PORT="29400"))
    assert (chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == ("10.0.0.5", "29400")
    # the step's task count, not the allocation's (a step smaller than its job)
    assert slurm_torch_env(srun_task(1, SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="2"))["WORLD_SIZE"] == "2"


@pytest.mark.parametrize(
    "env",
    [
        {},  # no Slurm at all
        # the batch script / an salloc shell: the allocation's variables, but no numbered step
        {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[1-2]"},
        {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "4294967294", "SLURM_PROCID": "0", "SLURM_NTASKS": "16",
         "SLURM_JOB_NODELIST": "gpu[1-2]"},  # the batch step's id
        {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "batch", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"},
    ],
    ids=["none", "allocation-shell", "batch-step", "named-step"],
)
def test_a_shell_in_an_allocation_is_not_a_rank(env):
    assert not in_srun_task(env)
    assert slurm_torch_env(env) == {}
    before = dict(env)
    assert apply_launcher_env(env) == "none" and env == before


def test_torchrun_variables_win_and_the_opt_out_is_honoured():
    env = {**srun_task(3), "RANK": "5", "WORLD_SIZE": "8"}  # torchrun started by srun, one task per node
    assert apply_launcher_env(env) == "torchrun" and env["RANK"] == "5" and "MASTER_ADDR" not in env
    env = {**srun_task(3), "MRLHF_LAUNCHER": "none"}
    assert apply_launcher_env(env) == "none" and "RANK" not in env
    env = srun_task(3)
    assert apply_launcher_env(env) == "srun" and (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "16", "3")


@pytest.mark.parametrize(
    "more,word",
    [({"SLURM_PROCID": "16"}, "outside the step's 16 tasks"), ({"SLURM_STEP_NUM_TASKS": "x"}, "not a whole number"),
     ({"SLURM_STEP_NODELIST": "", "SLURM_JOB_NODELIST": ""}, "no host to meet at")],
)  # fmt: skip
def test_inconsistent_slurm_variables_are_one_clear_error(more, word):
    with pytest.raises(ConfigError, match=word):
        slurm_torch_env(srun_task(0, **more))


def test_local_device_index():
    assert local_device_index(5, 8) == 5  # all of the node's GPUs visible: the local rank picks
    assert local_device_index(5, 1) == 0  # one GPU bound to the task (--gpus-per-task=1): it is device 0
    with pytest.raises(ConfigError, match="sees 4 CUDA devices"):
        local_device_index(6, 4)
    with pytest.raises(ConfigError, match="no CUDA device"):
        local_device_index(0, 0)


def test_a_refused_srun_task_prints_its_error_once_as_its_rank(monkeypatch, capsys):
    """Slurm variables that cannot become torch's: task 0 prints the one line at once; another task (after the grace
    that lets task 0 go first) names its rank -- not N unlabelled copies."""
    import mrlhf.cli as cli

    monkeypatch.setattr(cli, "ERROR_GRACE_S", 0.0)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MRLHF_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)
    config = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "ppo_13b.yaml")
    cases = [(srun_task(0, SLURM_STEP_NUM_TASKS="x"), "mrlhf: error: Slurm variable SLURM_STEP_NUM_TASKS='x'"),
             (srun_task(3, world=2), "mrlhf: error: (rank 3) SLURM_PROCID=3 is outside the step's 2 tasks")]  # fmt: skip
    for env, want in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert cli.main(["plan", "ppo", "--config", config]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(want), lines
