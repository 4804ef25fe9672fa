"""``mrlhf plan`` on the shipped 13B configs against hand-counted numbers (Llama-2-13B's parameter count, each
stage's share at TP8 x PP2, AdamW's bytes per parameter, the KV cache), ZeRO-1's partition, and its errors. Each plan
builds (and tears down) a one-process fake process group here; unit tests hold no real one. (The plan is held to
measured memory rank by rank in tests/distributed/test_plan_memory.py.)"""

from pathlib import Path

import pytest

from mrlhf.plan import RankPlan

ROOT = Path(__file__).resolve().parents[2]
H, FFN, LAYERS, VOCAB = 5120, 13824, 40, 32000
LLAMA2_13B = 13_015_864_320  # parameters of Llama-2-13B (HF: 40 layers, 5120 hidden, 13824 ffn, 32000 vocab)

@pytest.fixture(scope="module")
def plans() -> dict:
    from mrlhf.config import load_config
    from mrlhf.plan import plan

    cases = [
        ("sft_full", "configs/sft_13b.yaml", "sft", 1, ["parallel.tp=1", "parallel.pp=1"]),
        ("ppo16", "configs/ppo_13b.yaml", "ppo", 16, []),
        ("ppo32", "configs/ppo_13b.yaml", "ppo", 32, []),
        ("ppo16_resident", "configs/ppo_13b.yaml", "ppo", 16, ["ppo.offload_frozen=false", "ppo.estimator=grpo",
                                                                "ppo.n_samples=4", "ppo.ema_decay=0.99",
                                                                "ppo.offload_optimizer=true"]),  # fmt: skip
    ]
    return {name: plan(load_config(str(ROOT / path), overrides), world, stage, "cuda").to_json()
            for name, path, stage, world, overrides in cases}  # fmt: skip


def test_the_13b_config_is_llama2_13b(plans):
    (rank,) = plans["sft_full"]["ranks"]
    assert rank["phases"]["train"]["mem_actor_params_bytes"] == 2 * LLAMA2_13B  # bf16


def test_each_stage_holds_its_share_at_tp8_pp2(plans):
    layer = (4 * H * H + 3 * FFN * H) // 8 + 2 * H  # qkv+proj, gate/up+down split over TP; two norms replicated
    want = {0: 20 * layer + VOCAB * H // 8, 1: 20 * layer + VOCAB * H // 8 + H}  # embedding | output layer + norm
    p = plans["ppo16"]
    assert (p["tp"], p["pp"], p["dp"]) == (8, 2, 1)
    for rank in p["ranks"]:
        n = want[rank["pp_rank"]]
        train, gen, exp = (rank["phases"][ph] for ph in ("train", "generate", "experience"))
        assert train["mem_actor_params_bytes"] == 2 * n
        assert train["mem_actor_grads_bytes"] == 4 * n  # fp32 main_grad (training.grad_reduce_in_fp32)
        assert train["mem_actor_optimizer_bytes"] == 12 * n  # fp32 master + two fp32 moments (no CPU step counters)
        # frozen roles: on the GPU only while experience is made; gradients only in training; the cache in generation
        assert exp["mem_reference_params_bytes"] == 2 * n and gen["mem_reference_params_bytes"] == 0
        assert train["mem_reference_params_bytes"] == 0 and gen["mem_actor_grads_bytes"] == 0
        assert "mem_reference_grads_bytes" not in train and "mem_reward_optimizer_bytes" not in train
        # 20 layers x pp slots (2) x 32 rows x (1024 + 512) positions x 5 heads x 128, bf16, K and V
        assert gen["mem_kv_cache_bytes"] == 20 * 2 * 32 * 1536 * 5 * 128 * 2 * 2
        assert train["mem_kv_cache_bytes"] == exp["mem_kv_cache_bytes"] == 0
        # a phase's peak: one trained role's gradients at a time
        grads = max(train["mem_actor_grads_bytes"], train["mem_critic_grads_bytes"])
        assert rank["peak"]["train"] == sum(v for k, v in train.items() if "grads" not in k) + grads


def test_zero1_partitions_the_optimizer_over_dp(plans):
    one = {r["pp_rank"]: r["phases"]["train"] for r in plans["ppo16"]["ranks"]}
    two = plans["ppo32"]
    assert two["dp"] == 2 and len(two["ranks"]) == 4  # each stage's two DP ranks own different parameters
    for stage in (0, 1):
        held = [r["phases"]["train"] for r in two["ranks"] if r["pp_rank"] == stage]
        for role in ("actor", "critic"):
            key = f"mem_{role}_optimizer_bytes"
            assert sum(h[key] for h in held) == one[stage][key]
            assert all(0.4 * one[stage][key] < h[key] < 0.6 * one[stage][key] for h in held), [h[key] for h in held]
            assert all(h[f"mem_{role}_params_bytes"] == one[stage][f"mem_{role}_params_bytes"] for h in held)


def test_resident_frozen_roles_no_critic_the_ema_copy_and_offloaded_optimizer_state(plans):
    for rank, plain in zip(plans["ppo16_resident"]["ranks"], plans["ppo16"]["ranks"]):
        phases = rank["phases"]
        # ppo.offload_optimizer: AdamW's state is on the GPU only while training
        assert phases["train"]["mem_actor_optimizer_bytes"] == plain["phases"]["train"]["mem_actor_optimizer_bytes"]
        assert phases["generate"]["mem_actor_optimizer_bytes"] == phases["experience"]["mem_actor_optimizer_bytes"] == 0
        for phase, mem in rank["phases"].items():
            assert mem["mem_reference_params_bytes"] == mem["mem_actor_params_bytes"] > 0, phase  # kept resident
            assert mem["mem_ema_actor_params_bytes"] == mem["mem_actor_params_bytes"], phase
            assert not any(k.startswith("mem_critic_") for k in mem), phase  # GRPO builds no critic
        # four samples per prompt: 128 x 4 sequences, still 32 rows per slot
        assert rank["phases"]["generate"]["mem_kv_cache_bytes"] == 20 * 2 * 32 * 1536 * 5 * 128 * 2 * 2


def test_rank_plan_peak_counts_one_models_gradients_at_a_time():
    r = RankPlan(0, 0, {"train": {"mem_actor_params_bytes": 10, "mem_actor_grads_bytes": 20,
                                  "mem_critic_params_bytes": 1, "mem_critic_grads_bytes": 30,
                                  "mem_kv_cache_bytes": 0}})  # fmt: skip
    assert r.peak("train") == 10 + 1 + 30


def test_cli_errors_are_one_line_exit_2(capsys):
    from mrlhf.cli import main

    config = str(ROOT / "configs" / "ppo_13b.yaml")
    assert main(["plan", "ppo", "--config", config, "--world", "24"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["mrlhf: error: world size 24 is not divisible by parallel.tp*parallel.pp = 16"], lines
    assert main(["plan", "ppo", "--config", config, "--world", "0"]) == 2
    assert "world size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", "ppo", "--config", config, "--world", "48"]) == 2  # dp 3 does not split 128 prompts
    assert "must be a multiple of dp (3)" in capsys.readouterr().err
    assert main(["plan", "ppo", "--config", config, "--world", "16"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("mrlhf plan: ppo on 16 GPUs (tp=8 pp=2 dp=1), bf16; GiB per GPU")
    assert "peak generate" in table and "kv cache (generate)" in table
