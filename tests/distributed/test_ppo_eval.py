"""Held-out evaluation during PPO (``training.eval_interval``): it observes without changing training (a run with
it trains bit-identically to one without), its numbers agree across layouts (PP2 x DP2 vs TP1 within 1e-5 relative,
greedy), it scores with the reward model or with ``ppo.eval_reward_function`` on the eval split's own rows, and it
starts with the untrained policy (iteration 0)."""

import json
import math
import os

from harness import run_ranks
from ppo_runs import DEMO, ppo_rank

EVAL = [f"data.eval_path={DEMO}/prompts_eval.jsonl", "training.eval_interval=1", "training.eval_samples=12"]
EVAL_KEYS = ("eval_reward_mean", "eval_reward_std", "eval_response_length", "eval_truncation_rate")


def training_view(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time_", "iteration_time_s", "eval_")) and
            "_mem_" not in k}  # fmt: skip


def test_eval_changes_no_training_and_agrees_across_layouts(tmp_path):
    steps = ["training.train_steps=2"]
    (plain,) = run_ranks(ppo_rank, 1, str(tmp_path / "plain"), {}, steps)
    (ref,) = run_ranks(ppo_rank, 1, str(tmp_path / "ref"), {}, steps + EVAL)
    recs = ref["records"]
    assert [r["iteration"] for r in recs] == [0, 1, 2]  # the starting policy, then every iteration
    assert set(recs[0]) == {"iteration", *EVAL_KEYS, "eval_dropped_samples", "eval_samples", "time_eval_s"}
    for r in recs:
        assert r["eval_samples"] == 12 and r["eval_dropped_samples"] == 0
        assert all(math.isfinite(r[k]) for k in EVAL_KEYS) and r["eval_response_length"] > 0, r
        assert 0.0 <= r["eval_truncation_rate"] <= 1.0
    assert recs[0]["eval_reward_mean"] != recs[2]["eval_reward_mean"]  # training moved the policy
    # pure observation: the same training metrics and parameters as the run without evaluation, bit for bit
    assert [training_view(r) for r in recs[1:]] == [training_view(r) for r in plain["records"]]
    for role, params in plain["params"].items():
        for name, (p, _, _) in params.items():
            assert p.equal(ref["params"][role][name][0]), (role, name)
    lines = [json.loads(x) for x in open(os.path.join(str(tmp_path / "ref"), "metrics.jsonl"))]
    assert [x["iteration"] for x in lines if "eval_reward_mean" in x] == [0, 1, 2]
    # PP2 x DP2: six prompts per DP rank, the reward model on the last stage; same numbers
    for r in run_ranks(ppo_rank, 4, str(tmp_path / "pp2dp2"), {"pp": 2}, steps + EVAL):
        for got, want in zip(r["records"], recs):
            for k in EVAL_KEYS:
                assert math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-6), (r["coord"], k, got[k], want[k])


def test_eval_reward_function_scores_the_eval_rows_on_tp_rank0(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("EVAL_CALLS", str(calls))
    extra = ["training.train_steps=1", "ppo.estimator=grpo", "ppo.n_samples=2", "ppo.critic_load_dir=null",
             "ppo.reward_function=reward_fns:const_one", "ppo.eval_reward_function=reward_fns:eval_scored",
             "ppo.eval_before_train=false", *EVAL]  # fmt: skip
    from mrlhf.demo.task import parse_prompt

    rows = [json.loads(x) for x in open(os.path.join(DEMO, "prompts_eval.jsonl"))]
    with open(tmp_path / "eval.jsonl", "w") as f:  # the eval rows with a column of their own
        for row in rows:
            f.write(json.dumps({**row, "answer": parse_prompt(row["prompt"]).result}) + "\n")
    extra.append(f"data.eval_path={tmp_path / 'eval.jsonl'}")
    results = run_ranks(ppo_rank, 2, str(tmp_path / "run"), {"tp": 2}, extra)
    logged = [json.loads(x) for f in sorted(calls.iterdir()) for x in f.read_text().splitlines()]
    assert [c["coord"] for c in logged] == [[0, 0, 0]]  # once, on TP rank 0 (the other TP rank got it broadcast)
    (call,) = logged
    assert len(call["prompts"]) == 12  # the eval split's rows, 'answer' columns checked by the function itself
    assert all(any(row["prompt"] in p for row in rows) for p in call["prompts"])
    for r in results:
        (rec,) = r["records"]
        assert rec["reward_raw_mean"] == 1.0  # training scored with const_one ...
        want = sum(call["scores"]) / 12  # ... evaluation with the eval function
        assert math.isclose(rec["eval_reward_mean"], want, rel_tol=1e-6), (rec["eval_reward_mean"], want)
