"""PPO on the 3D-parallel backbone: layouts equal TP1 (GAE, GRPO, RLOO, REINFORCE++), rollout log-probs equal
training log-probs, exact resume (optimizer state included), the failure policy, role loading and offload, the
tokenizer check of every role's checkpoint, the KV cache's release after a rollout, the logged metrics, the ptx loss,
the critic's own optimizer.

Tolerance of the layout tests: per tensor, max |got - want| <= 1e-5 * max |want| (fp32, gloo); losses within 1e-5
relative.
"""

import json
import math
import os

import pytest
import torch
from harness import run_ranks
from ppo_runs import (
    DEMO,
    kv_cache_lifetime_rank,
    ppo_error_rank,
    ppo_overrides,
    ppo_rank,
    prepare_rank,
    rm_checkpoint_rank,
)
from sft_runs import ROOT, TINY
from stage_runs import sft_checkpoint_rank

REL_TOL = 1e-5
LAYOUTS = {"tp2": ({"tp": 2}, 2), "pp2": ({"pp": 2}, 2), "dp2": ({}, 2), "tp2pp2": ({"tp": 2, "pp": 2}, 4)}
PTX = os.path.join(DEMO, "sft_train.jsonl")  # SFT-format data of the ptx loss
TINY_TOKENIZER = os.path.join(ROOT, "mrlhf", "assets", "tiny", "tokenizer.model")  # not the demo one
LOSSES = ("pg_loss", "value_loss", "reward_raw_mean", "kl_per_sequence", "entropy", "approx_kl")
# what every GAE iteration logs (docs/ppo.md's metrics list)
METRICS = ("reward_raw_mean", "reward_raw_std", "reward_mean", "reward_std", "kl_per_sequence", "entropy",
           "clip_fraction", "approx_kl", "value_loss", "explained_variance", "response_length", "truncation_rate",
           "logprob_mismatch_max", "logprob_mismatch_mean", "skipped_steps", "time_generate_s", "time_experience_s",
           "time_train_s")  # fmt: skip


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
    """One GAE iteration moves both trained roles and logs every metric of METRICS, each finite."""
    rec = gae_ref["records"][0]
    missing = [k for k in METRICS if k not in rec]
    assert not missing, missing
    assert all(math.isfinite(rec[k]) for k in METRICS), {k: rec[k] for k in METRICS}
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


def test_gspo_sequence_ratio_tp2pp2_matches_single_process_and_differs_from_token_level(tmp_path):
    """GSPO (GRPO advantages, one clipped ratio per response): TP2xPP2 equals TP1; with two epochs and GSPO's narrow
    ranges some responses are clipped (0 < clip_fraction < 1), and the update is not the token-level one. That the
    clip is per response (every token of a row alike) is shown by hand values in tests/unit/test_gspo.py."""
    extra = ["ppo.estimator=grpo", "ppo.n_samples=4", "ppo.ppo_epochs=2", "ppo.clip_low=3e-4", "ppo.clip_high=4e-4",
             "ppo.loss_agg=seq-mean-token-mean"]  # fmt: skip
    gspo = [*extra, "ppo.importance_sampling_level=sequence"]
    (ref,) = run_ranks(ppo_rank, 1, str(tmp_path / "ref"), {}, gspo)
    rec = ref["records"][0]
    assert 0 < rec["clip_fraction"] < 1 and rec["pg_loss"] != 0, rec
    results = run_ranks(ppo_rank, 4, str(tmp_path / "tp2pp2"), {"tp": 2, "pp": 2}, gspo)
    for r in results:
        assert_records_match(r["records"], ref["records"], ("pg_loss", "reward_raw_mean", "clip_fraction", "approx_kl"))
    assert_params_match(results, ref, roles=("actor",))
    (token,) = run_ranks(ppo_rank, 1, str(tmp_path / "token"), {}, extra)
    assert token["records"][0]["clip_fraction"] != rec["clip_fraction"]
    assert any(not torch.equal(p, ref["params"]["actor"][n][0]) for n, (p, _, _) in token["params"]["actor"].items())


@pytest.mark.parametrize("estimator", ["reinforce++", "rloo"])
def test_reinforce_and_rloo_layouts_match_single_process(estimator, tmp_path):
    """The critic-free REINFORCE++ (whitened discounted returns, one sample per prompt: microbatches of 2 so DP2's 4
    sequences per rank still make 2 minibatches) and RLOO end to end: PP2 and DP2 equal TP1 within REL_TOL (records
    and actor parameters), and the update is not a no-op."""
    extra = {"reinforce++": ["ppo.estimator=reinforce++", "ppo.n_samples=1", "training.micro_batch_size=2"],
             "rloo": ["ppo.estimator=rloo", "ppo.n_samples=2"]}[estimator]  # fmt: skip
    (ref,) = run_ranks(ppo_rank, 1, str(tmp_path / "ref"), {}, extra, True)
    assert ref["roles"] == ["actor", "reference", "reward"]
    rec = ref["records"][0]
    assert rec["pg_loss"] != 0 and rec["actor_grad_norm"] > 0 and math.isfinite(rec["pg_loss"])
    moved = max(rel_diff(p, ref["initial"]["actor"][n][0]) for n, (p, _, _) in ref["params"]["actor"].items())
    assert moved > 1e-4
    for name in ("pp2", "dp2"):
        layout, world = LAYOUTS[name]
        results = run_ranks(ppo_rank, world, str(tmp_path / name), layout, extra)
        for r in results:
            assert_records_match(r["records"], ref["records"], ("pg_loss", "reward_raw_mean", "entropy", "approx_kl",
                                                                "kl_per_sequence"))  # fmt: skip
        assert_params_match(results, ref, roles=("actor",))


CRITIC_LR, CRITIC_CLIP = 2e-4, 1e-6


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    """gae_ref with two independent changes: a ptx loss on the actor, and the critic's own optimizer (another lr, a
    constant schedule, clip_grad 1e-6). Neither touches the other role within one iteration: the experience (values
    and advantages) is made before either model steps."""
    extra = [f"ppo.ptx_path={PTX}", "ppo.ptx_coef=0.1", "ppo.ptx_batch_size=4",
             f"critic_optimizer.lr={CRITIC_LR}", f"critic_optimizer.clip_grad={CRITIC_CLIP}",
             "critic_optimizer.weight_decay=0", "critic_scheduler.decay=constant"]  # fmt: skip
    (run,) = run_ranks(ppo_rank, 1, str(tmp_path_factory.mktemp("ppo_variant")), {}, extra, True)
    return run


def max_change(run: dict, role: str) -> float:
    return max(float((p - run["initial"][role][n][0]).abs().max()) for n, (p, _, _) in run["params"][role].items())


def test_ptx_loss_changes_the_actor_update(variant_run, gae_ref):
    """ppo.ptx_coef=0.1 vs gae_ref (ptx_coef 0): the same rollout (its records equal bit for bit), a reported finite
    positive ptx NLL, and actor parameters that differ by more than 1e-3 of a tensor's max somewhere."""
    rec, ref = variant_run["records"][0], gae_ref["records"][0]
    for k in ("reward_raw_mean", "kl_per_sequence", "response_length", "entropy"):
        assert rec[k] == ref[k], k  # the difference below comes from the update, not another rollout
    assert math.isfinite(rec["ptx_nll_per_minibatch"]) and rec["ptx_nll_per_minibatch"] > 0
    assert "ptx_nll_per_minibatch" not in ref
    diff = max(rel_diff(p, gae_ref["params"]["actor"][n][0]) for n, (p, _, _) in variant_run["params"]["actor"].items())
    assert diff > 1e-3, diff


def test_critic_has_its_own_lr_schedule_and_gradient_clipping(variant_run):
    """critic_optimizer/critic_scheduler drive the critic, optimizer/scheduler the actor.

    LR: the actor's cosine schedule (warmup 0, lr 5e-4, min_lr 0) over its 2 steps gives step 1 (the last, logged;
    progress 1/2) 5e-4 * 0.5 * (1 + cos(pi / 2)); the critic's constant one gives CRITIC_LR. Clipping: after clipping
    to norm c every gradient element has |g| <= c, and an Adam step moves an element by
    lr * |m_hat| / (sqrt(v_hat) + eps) <= lr * c / eps (m_hat is a weighted average of past gradients; no weight
    decay), so 2 steps at c = 1e-6, eps 1e-4 move the critic by at most 2 * CRITIC_LR * 1e-2 = 4e-6 (unclipped it moves
    ~100x that); the actor, clipped at its own 1.0, moves far more. The logged critic_grad_norm is the norm before
    clipping (far above c)."""
    rec = variant_run["records"][0]
    assert rec["actor_lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-12), rec["actor_lr"]
    assert rec["critic_lr"] == CRITIC_LR
    bound = 2 * CRITIC_LR * CRITIC_CLIP / 1e-4
    assert max_change(variant_run, "critic") <= bound, (max_change(variant_run, "critic"), bound)
    assert max_change(variant_run, "actor") > 10 * bound
    assert rec["critic_grad_norm"] > 1e3 * CRITIC_CLIP, rec["critic_grad_norm"]


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
        results = run_ranks(
            ppo_rank, world, str(tmp_path / f"rollout{world}"), layout, extra + ["ppo.old_logprobs=rollout"]
        )
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

    common = ["training.train_steps=3", "checkpoint.enabled=true", "checkpoint.save_interval=1",
              "ppo.kl_controller=adaptive", "ppo.kl_target=0.01", "ppo.kl_horizon=100", "ppo.ema_decay=0.5",
              f"ppo.ptx_path={PTX}", "ppo.ptx_coef=0.1", "ppo.ptx_batch_size=4",
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
        assert sorted(a["optimizers"]) == sorted(b["optimizers"]) == ["actor", "critic"]
        for role, opt in a["optimizers"].items():  # AdamW's moments and step counts, bit for bit
            want, got = opt["inner"], b["optimizers"][role]["inner"]
            assert got["param_groups"] == want["param_groups"], role
            assert sorted(got["state"]) == sorted(want["state"]) and want["state"], role
            for i, st in want["state"].items():
                assert sorted(st) == sorted(got["state"][i]) == ["exp_avg", "exp_avg_sq", "step"], (role, i)
                for k, v in st.items():
                    assert torch.equal(v, got["state"][i][k]), (role, i, k)
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


def test_nan_reward_drops_its_sample_and_empty_responses_stay_finite(tmp_path, capfd):
    """Sequence 3 gets a NaN reward: it is dropped, rank 0 names it once (sample 3 % 2 = 1 of the iteration's prompt
    3 // 2 = 1, with that prompt's text), and nothing logged or trained turns non-finite. The forked ranks write to
    the test's fd 1, which capfd reads."""
    from mrlhf.config import load_config
    from mrlhf.data.datasets import global_batch_indices
    from mrlhf.trainers.ppo import load_ppo_data

    cfg = load_config(TINY, ppo_overrides(str(tmp_path / "data"), {}, []))
    tokenizer, prompts, _ = load_ppo_data(cfg)
    idx = global_batch_indices(len(prompts.train), cfg.training.seed, 0, cfg.training.global_batch_size)[3 // 2]
    text = tokenizer.decode(list(prompts.train[idx]))
    with open(os.path.join(DEMO, "prompts_train.jsonl")) as f:  # every demo row is kept: index = file row
        assert json.loads(f.readlines()[idx])["prompt"] in text, text
    want = f"warning: non-finite reward for sample 1 of prompt {idx} ({text!r}): dropped"
    env = {"MRLHF_FAULT_NAN_REWARD": "3", "MRLHF_FAULT_EMPTY_RESPONSE": "0,9"}
    for estimator in ("gae", "grpo"):
        extra = [f"ppo.estimator={estimator}", "ppo.n_samples=2"]
        capfd.readouterr()
        results = run_ranks(ppo_rank, 2, str(tmp_path / estimator), {"pp": 2}, extra, env=env)
        warnings = [line for line in capfd.readouterr().out.splitlines() if "non-finite reward" in line]
        assert len(warnings) == 1 and warnings[0].endswith(want), (warnings, want)
        rec = results[0]["records"][0]
        assert rec["dropped_samples"] == 1.0
        assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float)), rec
        assert rec["skipped_steps"] == 0.0
        for r in results:
            for role in r["params"]:
                assert all(torch.isfinite(p).all() for p, _, _ in r["params"][role].values())


@pytest.fixture(scope="module")
def sft_rm_checkpoints(tmp_path_factory) -> tuple[str, str]:
    """A 2-step demo SFT checkpoint and a 2-step RM one trained from it (both with the demo tokenizer): the save
    directories the PPO roles load from."""
    out = tmp_path_factory.mktemp("sft_rm")
    run_ranks(sft_checkpoint_rank, 1, str(out / "sft"), "llama")
    sft = str(out / "sft" / "checkpoints")
    run_ranks(rm_checkpoint_rank, 1, str(out / "rm"), sft)
    return sft, str(out / "rm" / "checkpoints")


def test_roles_load_from_sft_and_rm_checkpoints_and_frozen_roles_are_offloaded(sft_rm_checkpoints, tmp_path):
    """Each role equals the checkpoint it loads (exactly), the frozen ones are offloaded, and the reward normaliser
    starts from the reward statistics the RM stored with its checkpoint (std within 1e-12: it is kept as m2)."""
    from mrlhf import checkpoint as ckpt

    sft, rm = sft_rm_checkpoints
    stats = ckpt.read_meta(ckpt.latest_checkpoint(rm))["train_state"]["extra"]["reward_stats"]
    assert stats["count"] > 0 and stats["std"] > 0, stats
    for layout, world in (({}, 1), ({"tp": 2}, 2)):
        for r in run_ranks(prepare_rank, world, str(tmp_path / f"p{world}"), layout, [], sft, rm):
            assert r["roles"] == ["actor", "critic", "reference", "reward"]
            assert all(d == 0.0 for d in r["diffs"].values()), r["diffs"]
            assert r["offloaded"] == {"reference": True, "reward": True}
            norm = r["normalizer"]  # initialised from the RM's held-out statistics
            assert norm["mean"] == stats["mean"] and norm["count"] == stats["count"], (norm, stats)
            assert norm["std"] == pytest.approx(stats["std"], rel=1e-12), (norm, stats)
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
    lines = [line for f in sorted(directory.iterdir()) for line in f.read_text().split("\n") if line]
    return [tuple(int(x) for x in line.split()) for line in lines]


def test_reward_function_layouts_match_single_process_and_it_runs_once_per_sample(tmp_path, monkeypatch):
    """GRPO scored by a Python function: TP2xPP2 and PP2xDP2 equal TP1 (same tolerance as above); the function runs
    on TP rank 0 of the last stage only, once per sample, and the prompt rows' columns reach it aligned (it checks
    each prompt's 'answer' column and fails the run otherwise). No reward model is built."""
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
    # two functions, weights 2 and 1: the sum leaves out the one that said None, so no sample is dropped; each
    # function's mean finite score is logged. N = 16 samples, k of them additions (nan_for_sums: None):
    # raw mean = (2 * mean_nan * (N - k) + 1 * N) / N
    calls2 = tmp_path / "calls2"
    calls2.mkdir()
    monkeypatch.setenv("REWARD_CALLS", str(calls2))
    two = ["ppo.reward_function=reward_fns:nan_for_sums,reward_fns:const_one", "ppo.reward_weights=[2.0, 1.0]"]
    (res2,) = run_ranks(ppo_rank, 1, str(tmp_path / "two"), {}, extra + two)
    rec2, k = res2["records"][0], sum(c[4] for c in _calls(calls2))
    assert rec2["dropped_samples"] == 0 and rec2["reward_fn_const_one_mean"] == 1.0 and 0 < k < 16
    want = (2 * rec2["reward_fn_nan_for_sums_mean"] * (16 - k) + 16) / 16
    assert abs(rec2["reward_raw_mean"] - want) <= 1e-6 * want, (rec2["reward_raw_mean"], want)
    # at TP2 the function runs on TP rank 0 only: its failure reaches TP rank 1 too (no rank left waiting)
    msgs = run_ranks(ppo_error_rank, 2, str(tmp_path / "err_tp2"), {"tp": 2},
                     extra + ["ppo.reward_function=reward_fns:broken"])  # fmt: skip
    assert msgs[0].startswith("ppo.reward_function=reward_fns:broken raised KeyError"), msgs[0]
    assert msgs[1] == "ppo.reward_function=reward_fns:broken failed on tensor-parallel rank 0 (its error says why)"


def test_a_role_checkpoint_made_with_another_tokenizer_is_refused_at_start_up(sft_rm_checkpoints, tmp_path):
    """Every role's checkpoint is checked against the run's tokenizer before any training: (1) data.tokenizer_path
    names another tokenizer (the tiny one, 384 pieces, vs the demo's 448) than the SFT checkpoint was made with -- the
    actor, checked first, is refused; (2) the run's tokenizer is the actor's and reference's but not the reward's (a
    copy of the RM checkpoint whose manifest records the tiny tokenizer's hash) -- the reward is refused, so not only
    the first role is checked. Each refusal is one line naming that checkpoint and both tokenizer hashes, and no
    iteration ran (no metrics.jsonl). Without the check (1) trains: the load keeps the first 384 embedding rows."""
    import shutil

    from mrlhf import checkpoint as ckpt
    from mrlhf.data.tokenizer import Tokenizer

    sft, rm = sft_rm_checkpoints
    demo, tiny = Tokenizer.load(os.path.join(DEMO, "tokenizer.model")).hash, Tokenizer.load(TINY_TOKENIZER).hash
    other_rm = str(tmp_path / "other_rm")
    shutil.copytree(rm, other_rm)
    meta_path = os.path.join(ckpt.latest_checkpoint(other_rm), "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["tokenizer_hash"] == demo
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump({**meta, "tokenizer_hash": tiny}, f)
    roles = [f"ppo.actor_load_dir={sft}", f"ppo.critic_load_dir={rm}"]
    for name, extra, refused, saved, run in (
        ("run_tokenizer", [f"data.tokenizer_path={TINY_TOKENIZER}"], sft, demo, tiny),
        ("reward_tokenizer", [f"ppo.reward_load_dir={other_rm}"], other_rm, tiny, demo),
    ):
        out = tmp_path / name
        (msg,) = run_ranks(ppo_error_rank, 1, str(out), {}, roles + extra)
        assert msg is not None and "\n" not in msg, (name, msg)
        assert msg.startswith(f"{ckpt.latest_checkpoint(refused)} was trained with tokenizer {saved[:12]}..."), msg
        assert f"this run's data.tokenizer_path has {run[:12]}..." in msg, msg
        assert not (out / "metrics.jsonl").exists(), name


@pytest.mark.parametrize("layout,world", [({}, 1), ({"pp": 2}, 2)], ids=["pp1", "pp2"])
def test_kv_cache_is_released_when_the_rollout_returns(layout, world, tmp_path):
    """Each stage's generator allocates one KV cache for the rollout (PP2: one slot per in-flight microbatch on each
    stage), attention works on its per-(layer, slot) views, and once ``rollout`` returns its K/V storage is gone:
    every K/V tensor and view is dead although the test still holds the cache object, and nothing else holds the cache
    itself. The rollout's reported kv_cache_bytes is what was allocated."""
    results = run_ranks(kv_cache_lifetime_rank, world, str(tmp_path), layout, [])
    for r in results:
        assert r["caches"] == 1 and r["allocated"][0] > 0 and r["stats_kv_bytes"] == r["allocated"][0], r
        # attention used it: (4 layers / pp on this stage) x (pp slots) views, every microbatch 4 rows
        assert r["views"] == [4] and r["response_tokens"] > 0, r
        assert r["released"] == [True] and r["alive_tensors"] == 0, r
        assert r["alive_caches"] == 0, r


def test_a_checkpoint_of_another_vocabulary_is_refused_even_without_a_tokenizer_record(sft_rm_checkpoints, tmp_path):
    """A checkpoint that records no tokenizer (as one written elsewhere might) skips the tokenizer check; its
    512-row embedding (demo vocabulary, padded) must still not load into this run's 384-row one (the tiny tokenizer):
    DCP would read the top-left corner of it and say nothing. One line naming the tensor and both shapes."""
    import shutil

    from mrlhf import checkpoint as ckpt

    sft, _ = sft_rm_checkpoints
    bare = str(tmp_path / "bare_sft")
    shutil.copytree(sft, bare)
    meta_path = os.path.join(ckpt.latest_checkpoint(bare), "meta.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta.pop("tokenizer_hash")
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    extra = [f"ppo.actor_load_dir={bare}", "ppo.critic_load_dir=null", f"data.tokenizer_path={TINY_TOKENIZER}",
             "ppo.estimator=grpo", "ppo.n_samples=2"]  # fmt: skip
    (msg,) = run_ranks(ppo_error_rank, 1, str(tmp_path / "run"), {}, extra)
    assert msg is not None and "\n" not in msg, msg
    assert "backbone.embedding.word_embeddings.weight is [512, 64] in the checkpoint but [384, 64] in this model" in msg
    assert bare in msg
