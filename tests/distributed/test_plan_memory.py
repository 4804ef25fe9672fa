"""``mrlhf plan`` against the runs it plans: every byte the plan predicts per rank, role, kind and phase equals what
the trainer's per-phase memory report measured on that rank (``residency.device_bytes``: parameters, gradients at the
step, optimizer state, KV cache), exactly. The second PPO iteration is compared (steady state: the first holds no
optimizer state before its first step). Prompts are truncated to ``data.max_prompt_len`` so the rollout's KV cache has
the plan's (largest) width."""

import json
import subprocess
import sys

import pytest
from harness import run_ranks
from ppo_runs import ppo_overrides, ppo_rank
from sft_runs import ROOT, TINY

PROMPT_LEN = 8  # every demo prompt is longer, so each is cut to this and the cache is as wide as the plan says


def cli_plan(stage: str, world: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mrlhf.cli", "plan", stage, "--config", TINY, "--world", str(world), "--json",
           "--device", "cpu", *overrides]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def compare(plan: dict, results: list[dict], phases=("generate", "experience", "train")) -> int:
    """Every rank's last record against the plan of its (stage, DP rank); returns how many numbers were compared."""
    compared = 0
    for r in results:
        tp_rank, pp_rank, dp_rank = r["coord"]
        stage = [x for x in plan["ranks"] if x["pp_rank"] == pp_rank]  # one entry, or one per DP rank (ZeRO-1)
        (rank,) = [x for x in stage if x["dp_rank"] == dp_rank] if len(stage) > 1 else stage
        rec = r["records"][-1]
        for phase in phases:
            want = rank["phases"][phase]
            got = {k[len(phase) + 1 :]: v for k, v in rec.items() if k.startswith(f"{phase}_mem_") and "cuda" not in k}
            assert got, (phase, sorted(rec))
            for key in sorted(set(want) | set(got)):
                assert want.get(key, 0) == got.get(key, 0), (r["coord"], phase, key, want.get(key), got.get(key))
                compared += 1
            assert sum(want.values()) > 0
    return compared


@pytest.mark.parametrize(
    "layout,world,extra",
    [
        # TP2 x PP2, GAE (all four roles), fp32, frozen roles offloaded, an EMA copy of the actor
        ({"tp": 2, "pp": 2}, 4, ["ppo.ema_decay=0.9"]),
        # DP2 with ZeRO-1 (uneven ownership), bf16 with fp32 gradients, GRPO (no critic), frozen roles kept resident,
        # the actor's optimizer state (masters included) in host memory outside training
        ({}, 2, ["parallel.zero1=true", "training.precision=bf16", "ppo.estimator=grpo",
                 "ppo.offload_frozen=false", "ppo.n_samples=4", "ppo.offload_optimizer=true"]),
    ],
    ids=["tp2pp2-gae-ema", "dp2-zero1-bf16-grpo"],
)
def test_plan_equals_the_measured_memory_of_every_rank(tmp_path, layout, world, extra):
    extra = ["training.train_steps=2", f"data.max_prompt_len={PROMPT_LEN}", "data.length_policy=truncate", *extra]
    results = run_ranks(ppo_rank, world, str(tmp_path / "run"), layout, extra)
    overrides = ppo_overrides(str(tmp_path / "plan"), layout, extra)
    plan = cli_plan("ppo", world, overrides)
    assert (plan["tp"], plan["pp"], plan["dp"]) == (layout.get("tp", 1), layout.get("pp", 1),
                                                    world // (layout.get("tp", 1) * layout.get("pp", 1)))  # fmt: skip
    assert compare(plan, results) >= 3 * world * 6
    if "parallel.zero1=true" in extra:  # ownership is per DP rank: the plan lists both, and they differ
        a, b = (x["phases"]["train"] for x in plan["ranks"])
        assert a["mem_actor_optimizer_bytes"] != b["mem_actor_optimizer_bytes"], (a, b)
        assert a["mem_reference_params_bytes"] > 0  # kept resident (ppo.offload_frozen=false)
        gen = plan["ranks"][0]["phases"]["generate"]
        # ppo.offload_optimizer: AdamW's 0-d step counters (kept on the CPU by torch) are all a CPU run still counts
        assert 0 < gen["mem_actor_optimizer_bytes"] < a["mem_actor_optimizer_bytes"] / 1000
