"""Exact resume: a run killed after step k and resumed equals an uninterrupted run, bit for bit; a save killed
midway leaves the previous checkpoint complete and chosen."""

import os

import pytest
import torch
from harness import run_ranks
from sft_runs import assert_bitwise_equal_params, set_fault, sft_rank

STEPS = 6
COMMON = [f"training.train_steps={STEPS}", "checkpoint.save_interval=2", "checkpoint.keep_last=2"]
LAYOUTS = {"dp2": ({}, 2, []), "pp2": ({"pp": 2}, 2, []), "dp2_zero1": ({}, 2, ["parallel.zero1=true"])}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kill_and_resume_is_bitwise_equal(name, tmp_path):
    layout, world, extra = LAYOUTS[name]
    full = run_ranks(sft_rank, world, str(tmp_path / "full"), layout, COMMON + extra)

    out = str(tmp_path / "killed")
    run_ranks(sft_rank, world, out, layout, COMMON + extra, env=set_fault("after_step:3"), expect_exit=137)
    ckpts = os.path.join(out, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000002"
    resumed = run_ranks(sft_rank, world, out, layout, COMMON + extra)

    # the resumed run redoes step 3 onwards: its losses are the uninterrupted run's, bit for bit
    for r_full, r_res in zip(full, resumed):
        assert r_res["losses"] == r_full["losses"][2:]
    assert_bitwise_equal_params(full, resumed)
    # retention kept the two newest
    assert sorted(e for e in os.listdir(ckpts) if e.startswith("step_")) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("fault", ["save_after_model", "save_before_latest"])
def test_save_killed_midway_keeps_previous_checkpoint(fault, tmp_path):
    from mrlhf.checkpoint import latest_checkpoint, read_meta

    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    # resuming the 2-step run with 4 steps changes train_steps, which resume refuses unless allowed (the warm-up
    # covers both steps, so the first two steps' learning rates are the same under either length)
    steps4 = ["training.train_steps=4", "checkpoint.save_interval=2", "checkpoint.allow_config_change=true"]
    full = run_ranks(sft_rank, 2, str(tmp_path / "full"), {}, steps4)
    # first save (step 2) completes, the second (step 4) is killed
    env = set_fault(fault)
    run_ranks(sft_rank, 2, out, {}, ["training.train_steps=2", "checkpoint.save_interval=2"])
    run_ranks(sft_rank, 2, out, {}, steps4, env=env, expect_exit=137)
    chosen = latest_checkpoint(ckpts)
    assert os.path.basename(chosen) == "step_00000002"
    assert read_meta(chosen)["train_state"]["step"] == 2
    # and resuming from it reproduces the uninterrupted run
    resumed = run_ranks(sft_rank, 2, out, {}, steps4)
    assert resumed[0]["losses"] == full[0]["losses"][2:]
    assert_bitwise_equal_params(full, resumed)
    # the killed attempt's leftovers were cleaned up by the successful save
    assert not [e for e in os.listdir(ckpts) if e.endswith(".tmp")]


def test_zero1_equals_unsharded_optimizer(tmp_path):
    steps = ["training.train_steps=4", "checkpoint.enabled=false", "optimizer.weight_decay=0.1"]
    plain = run_ranks(sft_rank, 2, str(tmp_path / "plain"), {}, steps)
    zero = run_ranks(sft_rank, 2, str(tmp_path / "zero"), {}, steps + ["parallel.zero1=true"])
    assert zero[0]["losses"] == plain[0]["losses"]
    assert_bitwise_equal_params(plain, zero)
    # the two dp replicas hold identical weights after the ZeRO broadcast
    for name, p in zero[0]["params"].items():
        assert torch.equal(p, zero[1]["params"][name])
