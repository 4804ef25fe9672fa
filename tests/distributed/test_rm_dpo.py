"""RM and DPO on the 3D-parallel backbone: layouts equal TP1, exact resume, and the RM -> PPO loading contract."""

import os

import pytest
from harness import run_ranks
from sft_runs import assert_bitwise_equal_params, assert_losses_match, assert_params_match, set_fault
from stage_runs import scores_rank, sft_checkpoint_rank, stage_rank

REL_TOL = 1e-5
LAYOUTS = {"tp2": ({"tp": 2}, 2), "pp2": ({"pp": 2}, 2), "dp2": ({}, 2), "tp2pp2": ({"tp": 2, "pp": 2}, 4)}


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    run_ranks(sft_checkpoint_rank, 1, out, "llama")
    return os.path.join(out, "checkpoints")


def steps(sft_ckpt, n=4):
    return [f"training.train_steps={n}", "checkpoint.enabled=false", f"checkpoint.load_dir={sft_ckpt}"]


@pytest.fixture(scope="module", params=["rm", "dpo"])
def stage_ref(request, sft_ckpt, tmp_path_factory):
    stage = request.param
    extra = steps(sft_ckpt) + (["dpo.beta=0.5"] if stage == "dpo" else ["rm.center_coef=0.01"])
    # eps 1e-4, not 1e-8: Adam turns the float noise of ~0 gradients (which differs with the layout's summation
    # order) into lr-sized steps of random sign. Measured, final weights of TP2 then differ from TP1 by up to 6e-4
    # (RM) and 1e-4 (DPO) of a tensor's max; with eps 1e-4, by <= 2e-6 in every layout (see test_sft_numerics.py).
    extra.append("optimizer.eps=1e-4")
    (ref,) = run_ranks(stage_rank, 1, stage, str(tmp_path_factory.mktemp(f"{stage}_ref")), {}, extra)
    assert len(ref["losses"]) == 4 and ref["losses"][-1] != ref["losses"][0]
    return stage, extra, ref


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_single_process(name, stage_ref, tmp_path):
    stage, extra, ref = stage_ref
    layout, world = LAYOUTS[name]
    results = run_ranks(stage_rank, world, stage, str(tmp_path / name), layout, extra)
    assert len(results) == world
    for r in results:
        assert_losses_match(r["losses"], ref["losses"], REL_TOL, f"{stage} {name}")
    # final weights too (the last step's update shows in no loss): each TP shard equals its slice of the TP1 run's
    assert_params_match(results, ref, REL_TOL)


def test_dpo_on_the_fly_reference_equals_precomputed(sft_ckpt, tmp_path):
    (pre,) = run_ranks(stage_rank, 1, "dpo", str(tmp_path / "a"), {}, steps(sft_ckpt, 3))
    fly = run_ranks(stage_rank, 2, "dpo", str(tmp_path / "b"), {"pp": 2}, steps(sft_ckpt, 3) + ["dpo.precompute_reference=false"])
    assert_losses_match(fly[0]["losses"], pre["losses"], REL_TOL, "on-the-fly vs precomputed reference")
    # the first step starts at the reference: the DPO loss is log 2
    assert abs(pre["losses"][0] - 0.6931471805599453) < 1e-6


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_resume_is_bitwise_equal(stage, sft_ckpt, tmp_path):
    common = [f"checkpoint.load_dir={sft_ckpt}", "training.train_steps=5", "checkpoint.save_interval=2"]
    full = run_ranks(stage_rank, 2, stage, str(tmp_path / "full"), {}, common)
    out = str(tmp_path / "killed")
    run_ranks(stage_rank, 2, stage, out, {}, common, env=set_fault("after_step:3"), expect_exit=137)
    resumed = run_ranks(stage_rank, 2, stage, out, {}, common)
    assert resumed[0]["losses"] == full[0]["losses"][2:]
    assert_bitwise_equal_params(full, resumed)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_rm_checkpoint_loads_as_reward_and_critic_at_another_layout(flavour, tmp_path):
    sft_out = str(tmp_path / "sft")
    run_ranks(sft_checkpoint_rank, 1, sft_out, flavour)
    extra = [f"model.flavour={flavour}", "training.train_steps=3", f"checkpoint.load_dir={sft_out}/checkpoints"]
    extra += ["model.num_query_groups=null"] if flavour == "gpt2" else []
    rm = run_ranks(stage_rank, 2, "rm", str(tmp_path / "rm"), {"tp": 2}, extra)
    stats = rm[0]["reward_stats"]
    assert stats["count"] > 0 and stats["std"] > 0  # reward normalisation statistics are stored
    ckpt_dir = str(tmp_path / "rm" / "checkpoints")
    (ref,) = run_ranks(scores_rank, 1, ckpt_dir, "reward", {}, flavour)
    assert not ref["new_head"]
    for role in ("reward", "critic"):
        for layout, world in (({"pp": 2}, 2), ({"tp": 2, "pp": 2}, 4)):
            results = [r for r in run_ranks(scores_rank, world, ckpt_dir, role, layout, flavour) if r["scores"] is not None]
            assert results and all(not r["new_head"] for r in results)
            for r in results:
                assert (r["scores"] - ref["scores"]).abs().max() <= 1e-5, (role, layout)
