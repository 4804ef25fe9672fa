"""PPO on the 3D-parallel backbone: layouts equal TP1, rollout log-probs equal training log-probs, exact resume,
the failure policy, role loading and offload.

Tolerance of the layout tests: per tensor, max |got - want| <= 1e-5 * max |want| (fp32, gloo); losses within 1e-5
relative.
"""

import math
import os

import pytest
import torch
from harness import run_ranks
from ppo_runs import ppo_error_rank, ppo_rank, prepare_rank, rm_checkpoint_rank
from stage_runs import sft_checkpoint_rank

REL_TOL = 1e-5
LAYOUTS = {"tp2": ({"tp": 2}, 2), "pp2": ({"pp": 2}, 2), "dp2": ({}, 2), "tp2pp2": ({"tp": 2, "pp": 2}, 4)}
LOSSES = ("pg_loss", "value_loss", "reward_raw_mean", "kl_per_sequence", "entropy", "approx_kl")


def shard(full: torch.Tensor, tp_split: bool, dim: int, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """The TP rank's slice of a TP1 tensor (SwiGLU fc1 keeps [gate_r; up_r] per rank)."""
    if not tp_split or tp == 1:
        return full
    if "linear_fc1" in name:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


def assert_params_match(results: list[dict], ref: dict, roles=("actor", "critic")) -> int:
    """Every rank's local shard equals the TP1 run's slice; returns how many tensors were compared."""
    compared = 0
    for r in results:
        tp_rank = r["coord"][0]
        for role in roles:
            if role not in ref["params"]:
                continue
            for name, (got, split, dim) in r["params"][role].items():
                want = shard(ref["params"][role][name][0], split, dim, name, r["tp"], tp_rank)
                assert got.shape == want.shape, (role, name)
                assert rel_diff(got, want) <= REL_TOL, (role, name, r["coord"], rel_diff(got, want))
                compared += 1
    return compared


def assert_records_match(got: list[dict], want: list[dict], keys=LOSSES) -> None:
    """Relative to max(|want|, floor). The on-policy surrogate is minus the mean of whitened (or group-normalised)
    advantages, a mean of O(1) terms that cancel to ~1e-4: its scale is 1, not its own size."""
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        for k in keys:
            if k in w:
                floor = 1.0 if k == "pg_loss" else 1e-3
                assert abs(g[k] - w[k]) <= REL_TOL * max(abs(w[k]), floor), (k, g[k], w[k])


@pytest.fixture(scope="module")
def gae_ref(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ppo_ref"))
    (ref,) = run_ranks(ppo_rank, 1, out, {}, [], True)
    return ref


def test_one_iteration_changes_the_roles(gae_ref):
    rec = gae_ref["records"][0]
    assert rec["pg_loss"] != 0 and rec["value_loss"] > 0 and rec["actor_grad_norm"] > 0
    for role in ("actor", "critic"):
        moved = max(rel_diff(p, gae_ref["initial"][role][n][0]) for n, (p, _, _) in gae_ref["params"][role].items())
        assert moved > 1e-4, role  # the comparison below is not between two untouched models


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gae_layouts_match_single_process(name, gae_ref, tmp_path):
    layout, world = LAYOUTS[name]
    results = run_ranks(ppo_rank, world, str(tmp_path), layout, [])
    for r in results:
        assert_records_match(r["records"], gae_ref["records"])
    n = assert_params_match(results, gae_ref)
    assert n >= len(gae_ref["params"]["actor"])


def test_grpo_tp2pp2_matches_single_process(tmp_path):
    extra = ["ppo.estimator=grpo", "ppo.n_samples=4", "ppo.kl_placement=loss", "ppo.kl_estimator=k3",
             "ppo.loss_agg=seq-mean-token-sum-norm", "ppo.entropy_coef=0.01"]  # fmt: skip
    (ref,) = run_ranks(ppo_rank, 1, str(tmp_path / "ref"), {}, extra)
    assert "critic" not in ref["roles"]  # critic-free: never built
    assert ref["records"][0]["pg_loss"] != 0
    results = run_ranks(ppo_rank, 4, str(tmp_path / "tp2pp2"), {"tp": 2, "pp": 2}, extra)
    for r in results:
        assert_records_match(r["records"], ref["records"], ("pg_loss", "reward_raw_mean", "entropy", "approx_kl"))
    assert_params_match(results, ref, roles=("actor",))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_training_logprobs(temperature, tmp_path):
    extra = [f"generation.temperature={temperature}", "ppo.num_minibatches=1"]
    for layout, world in (({}, 1), ({"pp": 2}, 2)):
        results = run_ranks(ppo_rank, world, str(tmp_path / str(world)), layout, extra)
        rec = results[0]["records"][0]
        assert rec["logprob_mismatch_max"] <= 1e-5, rec["logprob_mismatch_max"]
        # the first minibatch of the first epoch is on-policy: the ratio is 1, nothing is clipped
        assert rec["clip_fraction"] == 0.0 and abs(rec["approx_kl"]) < 1e-9, (rec["clip_fraction"], rec["approx_kl"])


def test_old_logprobs_from_the_rollout_match_the_recompute(tmp_path):
    """ppo.old_logprobs=rollout skips experience making's actor pass: the update (2 epochs: the second reads the
    rollout's log-probs as old ones) equals the recomputing run within the layout tolerance, at PP1 and PP2, and the
    update's first forward measures entropy and the rollout/training mismatch in its place."""
    extra = ["ppo.num_minibatches=1", "ppo.ppo_epochs=2"]
    (ref,) = run_ranks(ppo_rank, 1, str(tmp_path / "recompute"), {}, extra)
    for layout, world in (({}, 1), ({"pp": 2}, 2)):
        results = run_ranks(ppo_rank, world, str(tmp_path / f"rollout{world}"), layout, extra + ["ppo.old_logprobs=rollout"])
        for r in results:  # the KL (k1, in the reward) is read off the rollout's log-probs: see below
            assert_records_match(r["records"], ref["records"], tuple(k for k in LOSSES if k != "kl_per_sequence"))
        assert_params_match(results, ref)
        rec = results[-1]["records"][0]
        # per token k1 moves by at most the log-prob mismatch; a sequence has at most max_new_tokens (8) of them
        kl_gap = abs(rec["kl_per_sequence"] - ref["records"][0]["kl_per_sequence"])
        assert kl_gap <= 8 * rec["logprob_mismatch_max"] + 1e-12, (kl_gap, rec["logprob_mismatch_max"])
        assert abs(rec["entropy"] - ref["records"][0]["entropy"]) <= REL_TOL * abs(ref["records"][0]["entropy"])
        assert rec["logprob_mismatch_max"] <= 1e-5 and rec["logprob_mismatch_mean"] <= rec["logprob_mismatch_max"]


def test_resume_mid_run_is_bitwise_equal(tmp_path):
    from sft_runs import set_fault

    ptx = os.path.join(os.path.dirname(__file__), "..", "..", "mrlhf", "assets", "demo", "sft_train.jsonl")
    common = ["training.train_steps=3", "checkpoint.enabled=true", "checkpoint.save_interval=1",
              "ppo.kl_controller=adaptive", "ppo.kl_target=0.01", "ppo.kl_horizon=100", "ppo.ema_decay=0.5",
              f"ppo.ptx_path={os.path.abspath(ptx)}", "ppo.ptx_coef=0.1", "ppo.ptx_batch_size=4",
              "ppo.ppo_epochs=2", "ppo.critic_warmup_iterations=1"]  # fmt: skip
    full = run_ranks(ppo_rank, 2, str(tmp_path / "full"), {}, common)
    out = str(tmp_path / "killed")
    run_ranks(ppo_rank, 2, out, {}, common, env=set_fault("after_step:2"), expect_exit=137)
    resumed = run_ranks(ppo_rank, 2, out, {}, common)
    assert "pg_loss" not in full[0]["records"][0] and "pg_loss" in full[0]["records"][1]  # critic warm-up
    assert full[0]["records"][-1]["kl_coef"] != 0.1  # the adaptive controller moved
    for a, b in zip(full, resumed):
        assert a["coord"] == b["coord"]
        skip = ("time_", "iteration_time_s", "mem_")
        want = {k: v for k, v in a["records"][2].items() if not k.startswith(skip) and "_mem_" not in k}
        got = {k: v for k, v in b["records"][0].items() if not k.startswith(skip) and "_mem_" not in k}
        assert got == want
        for k in ("kl_controller", "reward_normalizer", "actor_updates", "critic_updates", "ptx_consumed"):
            assert a["extra"][k] == b["extra"][k], k
        for role in a["params"]:
            for name, (p, _, _) in a["params"][role].items():
                assert torch.equal(p, b["params"][role][name][0]), (role, name)


def test_nan_loss_on_one_rank_skips_the_step_everywhere(tmp_path):
    extra = ["ppo.num_minibatches=1"]
    results = run_ranks(ppo_rank, 2, str(tmp_path / "a"), {}, extra, True, env={"MRLHF_FAULT_NAN_LOSS": "1:0"})
    for r in results:
        rec = r["records"][0]
        assert rec["skipped_steps"] == 1.0 and rec["skipped_steps_total"] == 1.0
        for name, (p, _, _) in r["params"]["actor"].items():  # the actor step was skipped: weights untouched
            assert torch.equal(p, r["initial"]["actor"][name][0]), name
        moved = max(rel_diff(p, r["initial"]["critic"][n][0]) for n, (p, _, _) in r["params"]["critic"].items())
        assert moved > 1e-4  # the critic's step went ahead
    # an actor whose loss is always NaN stops the run after K skips in a row -- also under GAE, where the critic's
    # good steps in between must not reset the actor's count
    for estimator in ("grpo", "gae"):
        msgs = run_ranks(ppo_error_rank, 2, str(tmp_path / f"b_{estimator}"), {},
                         ["training.train_steps=4", "training.max_consecutive_skips=2", f"ppo.estimator={estimator}"],
                         env={"MRLHF_FAULT_NAN_LOSS": "0:*"})  # fmt: skip
        for m in msgs:
            assert m is not None and ": actor: 2 optimizer steps in a row" in m and "max_consecutive_skips=2" in m, m


def test_nan_reward_drops_its_sample_and_empty_responses_stay_finite(tmp_path):
    env = {"MRLHF_FAULT_NAN_REWARD": "3", "MRLHF_FAULT_EMPTY_RESPONSE": "0,9"}
    for estimator in ("gae", "grpo"):
        extra = [f"ppo.estimator={estimator}", "ppo.n_samples=2"]
        results = run_ranks(ppo_rank, 2, str(tmp_path / estimator), {"pp": 2}, extra, env=env)
        rec = results[0]["records"][0]
        assert rec["dropped_samples"] == 1.0
        assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float)), rec
        assert rec["skipped_steps"] == 0.0
        for r in results:
            for role in r["params"]:
                assert all(torch.isfinite(p).all() for p, _, _ in r["params"][role].values())


def test_roles_load_from_sft_and_rm_checkpoints_and_frozen_roles_are_offloaded(tmp_path):
    sft_out, rm_out = str(tmp_path / "sft"), str(tmp_path / "rm")
    run_ranks(sft_checkpoint_rank, 1, sft_out, "llama")
    sft = os.path.join(sft_out, "checkpoints")
    run_ranks(rm_checkpoint_rank, 1, rm_out, sft)
    rm = os.path.join(rm_out, "checkpoints")
    for layout, world in (({}, 1), ({"tp": 2}, 2)):
        for r in run_ranks(prepare_rank, world, str(tmp_path / f"p{world}"), layout, [], sft, rm):
            assert r["roles"] == ["actor", "critic", "reference", "reward"]
            assert all(d == 0.0 for d in r["diffs"].values()), r["diffs"]
            assert r["offloaded"] == {"reference": True, "reward": True}
            assert r["normalizer"]["count"] > 0  # initialised from the RM's held-out statistics
    # a checkpoint of another shape is refused, naming the checkpoint and the field
    msgs = run_ranks(ppo_error_rank, 1, str(tmp_path / "bad"), {},
                     [f"ppo.actor_load_dir={sft}", f"ppo.critic_load_dir={rm}", "model.hidden_size=128"])  # fmt: skip
    assert msgs[0] is not None and "hidden_size 64 (checkpoint) vs 128 (run)" in msgs[0] and sft in msgs[0], msgs[0]


def test_memory_report_per_phase_with_and_without_offload(tmp_path):
    for offload in (True, False):
        (r,) = run_ranks(ppo_rank, 1, str(tmp_path / str(offload)), {}, [f"ppo.offload_frozen={str(offload).lower()}"])
        rec = r["records"][0]
        actor = rec["train_mem_actor_params_bytes"]
        assert actor > 0 and rec["train_mem_actor_optimizer_bytes"] > 0 and rec["generate_mem_kv_cache_bytes"] > 0
        for role in ("reference", "reward"):
            for phase in ("generate", "train"):
                held = rec[f"{phase}_mem_{role}_params_bytes"]
                assert (held == 0) if offload else (held > 0), (offload, role, phase, held)


# ---- ppo.reward_function (verifiable rewards): rewards from Python instead of a reward model ----------------------


def _calls(directory) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in line.split()) for f in sorted(directory.iterdir()) for line in f.read_text().split("\n")
            if line]  # fmt: skip


def test_reward_function_layouts_match_single_process_and_it_runs_once_per_sample(tmp_path, monkeypatch):
    """GRPO scored by a Python function: TP2xPP2 and PP2xDP2 equal TP1 (same tolerance as above); the function runs
    on TP rank 0 of the last stage only, once per sample, and the prompt rows' columns reach it aligned (it checks
    each prompt's 'answer' column and fails the run otherwise). No reward model is built."""
    import json

    from ppo_runs import DEMO

    from mrlhf.demo.task import parse_prompt

    data = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in open(os.path.join(DEMO, "prompts_train.jsonl"))]
    data.write_text("".join(json.dumps({**r, "answer": parse_prompt(r["prompt"]).result}) + "\n" for r in rows))
    extra = ["ppo.estimator=grpo", "ppo.n_samples=4", "ppo.reward_function=reward_fns:checked_length",
             f"data.train_path={data}"]  # fmt: skip
    runs = {}
    for name, layout, world, pp, dp in (("ref", {}, 1, 1, 1), ("tp2pp2", {"tp": 2, "pp": 2}, 4, 2, 1),
                                        ("pp2dp2", {"pp": 2}, 4, 2, 2)):  # fmt: skip
        calls = tmp_path / name / "calls"
        calls.mkdir(parents=True)
        monkeypatch.setenv("REWARD_CALLS", str(calls))
        runs[name] = run_ranks(ppo_rank, world, str(tmp_path / name), layout, extra)
        got = _calls(calls)
        assert sorted(c[:3] for c in got) == [(0, pp - 1, d) for d in range(dp)], name  # TP rank 0, last stage
        assert sum(c[3] for c in got) == 8 * 4, name  # every sample of the iteration once: 8 prompts x 4
    (ref,) = runs["ref"]
    assert ref["roles"] == ["actor", "reference"]
    rec = ref["records"][0]
    assert rec["reward_raw_std"] > 0 and rec["pg_loss"] != 0 and rec["time_reward_function_s"] > 0
    for name in ("tp2pp2", "pp2dp2"):
        for r in runs[name]:
            assert_records_match(r["records"], ref["records"], ("pg_loss", "reward_raw_mean", "reward_raw_std",
                                                                "approx_kl", "kl_per_sequence"))  # fmt: skip
        assert_params_match(runs[name], ref, roles=("actor",))


def test_reward_function_nan_drops_its_samples_and_an_error_is_one_line(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("REWARD_CALLS", str(calls))
    extra = ["ppo.estimator=rloo", "ppo.n_samples=2"]
    (res,) = run_ranks(ppo_rank, 1, str(tmp_path / "nan"), {}, extra + ["ppo.reward_function=reward_fns:nan_for_sums"])
    nans = sum(c[4] for c in _calls(calls))
    rec = res["records"][0]
    assert 0 < nans < 16 and rec["dropped_samples"] == nans  # the batch holds addition prompts and others
    assert all(math.isfinite(rec[k]) for k in ("pg_loss", "reward_raw_mean", "approx_kl", "actor_grad_norm"))
    (msg,) = run_ranks(ppo_error_rank, 1, str(tmp_path / "err"), {}, extra + ["ppo.reward_function=reward_fns:broken"])
    assert msg.startswith("ppo.reward_function=reward_fns:broken raised KeyError: 'verifier service unreachable' (at ")
    assert "reward_fns.py:" in msg and "\n" not in msg
