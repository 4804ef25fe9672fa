"""PPO building blocks on one CPU process: residency (offload/reload and the byte report), the rollout record,
PPO config validation and batch arithmetic, `mrlhf plot`, and the `mrlhf ppo` command line's user errors.

Expectations are written out by hand (byte counts, token layouts, error positions), not recomputed with the code
under test.
"""

from __future__ import annotations

import gc
import json
import math
import socket
import weakref
from pathlib import Path

import pytest
import torch

from mrlhf.config import load_config
from mrlhf.errors import ConfigError, DataError
from mrlhf.models import residency
from mrlhf.rl.experience import Experience, build_rollout

ROOT = Path(__file__).resolve().parents[2]
PPO_YAML = str(ROOT / "configs" / "ppo_demo.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- residency ---------------------------------------------------------------------------------------------------


class Tiny(torch.nn.Module):
    """Linear(3 -> 2): weight 6 + bias 2 fp32 elements, and a 4-element fp32 buffer."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(2, 3, generator=g))
            self.lin.bias.copy_(torch.randn(2, generator=g))
        self.register_buffer("scale", torch.tensor([1.5, -2.0, 0.25, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale[:2]


PARAM_BYTES = (6 + 2) * 4  # weight + bias, fp32
BUFFER_BYTES = 4 * 4
CPU = torch.device("cpu")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_offload_releases_storage_and_keeps_host_copies() -> None:
    model = Tiny()
    before = snapshot(model)
    tensors = [model.lin.weight, model.lin.bias, model.scale]
    storages = [weakref.ref(t.untyped_storage()) for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    assert all(s() is not None for s in storages)
    assert not residency.is_offloaded(model)

    residency.offload(model)
    gc.collect()
    assert residency.is_offloaded(model)
    for t in tensors:
        assert t.numel() == 0 and t.device == CPU
    # the original storages are gone (nothing holds them any more), not just hidden behind a new view
    assert all(s() is None for s in storages)
    host = model.mrlhf_host_copies
    assert len(host) == 3
    for h, name in zip(host, ("lin.weight", "lin.bias", "scale")):
        assert torch.equal(h, before[name])
        assert h.data_ptr() not in ptrs  # a copy, not the old storage kept alive
    # the module still has the same Parameter objects, requires_grad untouched
    assert isinstance(model.lin.weight, torch.nn.Parameter) and model.lin.weight.requires_grad


def test_forward_through_an_offloaded_model_fails() -> None:
    model = Tiny()
    residency.offload(model)
    with pytest.raises(RuntimeError):
        model(torch.ones(1, 3))


def test_reload_restores_values_bitwise_and_shapes() -> None:
    model = Tiny()
    x = torch.tensor([[0.5, -1.0, 2.0]])
    want_out = model(x).detach()
    before = snapshot(model)
    residency.offload(model)
    residency.reload(model, CPU)
    assert not residency.is_offloaded(model)
    assert model.mrlhf_host_copies is None
    assert model.lin.weight.shape == (2, 3) and model.lin.bias.shape == (2,) and model.scale.shape == (4,)
    after = model.state_dict()
    for name, v in before.items():
        assert after[name].dtype == v.dtype
        assert torch.equal(after[name], v), name
    assert torch.equal(model(x).detach(), want_out)


def test_offload_twice_is_idempotent() -> None:
    model = Tiny()
    before = snapshot(model)
    residency.offload(model)
    first = model.mrlhf_host_copies
    residency.offload(model)  # must not overwrite the host copies with the (now empty) parameters
    assert model.mrlhf_host_copies is first
    assert [h.shape for h in first] == [torch.Size([2, 3]), torch.Size([2]), torch.Size([4])]
    residency.reload(model, CPU)
    for name, v in model.state_dict().items():
        assert torch.equal(v, before[name]), name
    residency.reload(model, CPU)  # reloading a resident model changes nothing
    for name, v in model.state_dict().items():
        assert torch.equal(v, before[name]), name


def test_device_bytes_resident_offloaded_and_other_device() -> None:
    model = Tiny()
    assert residency.device_bytes(model, CPU) == {"params": PARAM_BYTES + BUFFER_BYTES, "grads": 0}
    model(torch.ones(4, 3)).sum().backward()
    assert residency.device_bytes(model, CPU) == {"params": PARAM_BYTES + BUFFER_BYTES, "grads": PARAM_BYTES}
    # only tensors on the asked device count
    assert residency.device_bytes(model, torch.device("meta")) == {"params": 0, "grads": 0}
    residency.offload(model)
    assert residency.device_bytes(model, CPU)["params"] == 0
    residency.reload(model, CPU)
    assert residency.device_bytes(model, CPU)["params"] == PARAM_BYTES + BUFFER_BYTES


def test_device_bytes_counts_torch_adamw_state() -> None:
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert residency.device_bytes(model, CPU, opt)["optimizer"] == 0  # no state before the first step
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    # per parameter: exp_avg + exp_avg_sq (numel fp32 each) + a 0-d fp32 'step' tensor (torch keeps it on CPU)
    want = (2 * 6 * 4 + 4) + (2 * 2 * 4 + 4)
    assert residency.device_bytes(model, CPU, opt)["optimizer"] == want


def test_device_bytes_counts_mrlhf_optimizer_state_and_fp32_masters() -> None:
    from mrlhf.config import OptimizerConfig
    from mrlhf.trainers.optim import Optimizer

    model = Tiny().to(torch.bfloat16)
    opt = Optimizer(list(model.parameters()), OptimizerConfig())
    assert opt.use_master
    model(torch.ones(4, 3, dtype=torch.bfloat16)).float().sum().backward()
    opt.step(1e-3)
    got = residency.device_bytes(model, CPU, opt)
    assert got["params"] == (6 + 2) * 2 + 4 * 2  # bf16 params and buffer
    assert got["grads"] == (6 + 2) * 4  # fp32 main_grad (the optimizer accumulates bf16 grads in fp32 by default)
    # fp32 masters (8 * 4) + AdamW state over the masters: 2 * 8 * 4 + two 0-d fp32 step tensors
    assert got["optimizer"] == 8 * 4 + 2 * 8 * 4 + 2 * 4


# ---- rollout record ----------------------------------------------------------------------------------------------

PAD = 7


def hand_rollout() -> Experience:
    """Prompt [11, 12, 13] + response [14, 15]; prompt [21] + response [22, 23, 24] (truncated); width 5."""
    return build_rollout(
        prompts=[[11, 12, 13], [21]],
        responses=[[14, 15], [22, 23, 24]],
        response_logprobs=[[-0.5, -0.25], [-1.0, -2.0, -3.0]],
        truncated=[False, True],
        seq_ids=[4, 9],
        prompt_index=[2, 4],
        width=5,
        pad_id=PAD,
        device=CPU,
    )


def test_build_rollout_hand_case() -> None:
    e = hand_rollout()
    assert e.batch_size == 2
    assert e.tokens.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, PAD]]
    assert e.labels.tolist() == [[12, 13, 14, 15, PAD], [22, 23, 24, PAD, PAD]]
    assert e.attention_mask.tolist() == [[True] * 5, [True, True, True, True, False]]
    # response of L tokens after a prompt of P: label positions [P-1, P-1+L) -> [2, 4) and [0, 3)
    assert e.action_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert e.rollout_logprobs.tolist() == [[0, 0, -0.5, -0.25, 0], [-1.0, -2.0, -3.0, 0, 0]]
    # every action position is labelled with the response token it scores
    assert e.labels[0, 2:4].tolist() == [14, 15] and e.labels[1, 0:3].tolist() == [22, 23, 24]
    assert e.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert e.response_length.tolist() == [2, 3]
    assert e.truncated.tolist() == [False, True]
    assert e.seq_ids.tolist() == [4, 9] and e.prompt_index.tolist() == [2, 4]
    assert e.tokens.dtype == torch.long and e.labels.dtype == torch.long and e.position_ids.dtype == torch.long
    assert e.attention_mask.dtype == torch.bool and e.truncated.dtype == torch.bool
    assert e.action_mask.dtype == torch.float32 and e.rollout_logprobs.dtype == torch.float32
    assert e.old_logprobs is None and e.values is None and e.advantages is None


def test_build_rollout_empty_response_has_no_actions() -> None:
    e = build_rollout([[5, 6]], [[]], [[]], [False], [0], [0], width=4, pad_id=0, device=CPU)
    assert e.tokens.tolist() == [[5, 6, 0, 0]]
    assert e.labels.tolist() == [[6, 0, 0, 0]]
    assert e.action_mask.sum().item() == 0 and e.response_length.tolist() == [0]


def test_build_rollout_sequence_longer_than_width_raises() -> None:
    with pytest.raises(ValueError, match=r"6 tokens .* width 5"):
        build_rollout([[1, 2, 3]], [[4, 5, 6]], [[-1.0, -1.0, -1.0]], [False], [0], [0], width=5, pad_id=0, device=CPU)


def test_select_picks_rows_of_every_set_field() -> None:
    e = hand_rollout()
    e.values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [1.1, 1.2, 1.3, 1.4, 1.5]])
    s = e.select(torch.tensor([1, 0]))
    assert s is not e
    assert s.tokens.tolist() == [[21, 22, 23, 24, PAD], [11, 12, 13, 14, 15]]
    assert s.action_mask.tolist() == [[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]]
    assert torch.equal(s.values, torch.tensor([[1.1, 1.2, 1.3, 1.4, 1.5], [0.1, 0.2, 0.3, 0.4, 0.5]]))
    assert s.seq_ids.tolist() == [9, 4] and s.truncated.tolist() == [True, False]
    assert s.old_logprobs is None and s.advantages is None
    one = e.select(torch.tensor([1]))
    assert one.batch_size == 1 and one.response_length.tolist() == [3]


def test_to_device_moves_every_set_field() -> None:
    e = hand_rollout()
    same = e.to(CPU)
    assert same is not e and same.tokens is e.tokens  # already there: shared, a new record
    e.old_logprobs = torch.zeros(2, 5)
    m = e.to(torch.device("meta"))
    assert m.tokens.device.type == "meta" and m.old_logprobs.device.type == "meta"
    assert m.rollout_logprobs.shape == (2, 5) and m.values is None
    assert e.tokens.device == CPU  # the original is untouched


def test_microbatches_sizes_order_and_keys() -> None:
    e = build_rollout(
        [[1], [2], [3]], [[10, 11], [20], [30, 31]], [[-1.0, -2.0], [-3.0], [-4.0, -5.0]],
        [False, False, True], [0, 1, 2], [0, 1, 2], width=3, pad_id=0, device=CPU,
    )  # fmt: skip
    e.old_logprobs = torch.tensor([[0.0, 0.1, 0.2], [1.0, 1.1, 1.2], [2.0, 2.1, 2.2]])
    mbs = e.microbatches(torch.tensor([2, 0, 1]), 2, ("action_mask", "old_logprobs"))
    assert len(mbs) == 2
    assert set(mbs[0]) == {"tokens", "position_ids", "attention_mask", "labels", "logits_from", "action_mask",
                           "old_logprobs"}  # fmt: skip
    assert mbs[0]["tokens"].tolist() == [[3, 30, 31], [1, 10, 11]]
    assert mbs[1]["tokens"].tolist() == [[2, 20, 0]]
    assert mbs[0]["labels"].tolist() == [[30, 31, 0], [10, 11, 0]]
    assert mbs[1]["attention_mask"].tolist() == [[True, True, False]]
    assert torch.equal(mbs[0]["old_logprobs"], torch.tensor([[2.0, 2.1, 2.2], [0.0, 0.1, 0.2]]))
    assert mbs[1]["action_mask"].tolist() == [[1, 0, 0]]
    assert [mb["tokens"].shape[0] for mb in e.microbatches(torch.arange(3), 1, ())] == [1, 1, 1]
    assert set(e.microbatches(torch.arange(3), 3, ())[0]) == {"tokens", "position_ids", "attention_mask", "labels",
                                                             "logits_from"}  # fmt: skip


def test_microbatches_start_logits_at_their_first_response_position() -> None:
    """Prompts of 3, 1 and 2 tokens: responses start at label positions 2, 0 and 1; a microbatch starts its logits at
    the earliest of its rows (a host tensor: no device sync), and Experience.to leaves response_start on the host."""
    e = build_rollout(
        [[1, 2, 3], [4], [5, 6]], [[10], [20, 21], [30]], [[-1.0], [-2.0, -3.0], [-4.0]], [False] * 3, [0, 1, 2],
        [0, 1, 2], width=4, pad_id=0, device=CPU,
    )  # fmt: skip
    assert e.response_start.tolist() == [2, 0, 1]
    assert [int(mb["logits_from"]) for mb in e.microbatches(torch.tensor([0, 2, 1]), 2, ())] == [1, 0]
    assert [int(mb["logits_from"]) for mb in e.microbatches(torch.tensor([0, 2, 1]), 1, ())] == [2, 1, 0]
    assert e.to(torch.device("meta")).response_start.device.type == "cpu"


def test_microbatches_refuse_an_unset_key() -> None:
    e = hand_rollout()
    with pytest.raises(ValueError, match="Experience.advantages is not set"):
        e.microbatches(torch.arange(2), 1, ("action_mask", "advantages"))


# ---- PPO config --------------------------------------------------------------------------------------------------


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


BAD_PPO = [
    (["ppo.estimator=nope"], ["ppo.estimator", "'nope'"]),
    (["ppo.estimator=grpo", "ppo.n_samples=1"], ["ppo.estimator=grpo", "ppo.n_samples >= 2"]),
    (["ppo.estimator=rloo"], ["ppo.estimator=rloo", "ppo.n_samples >= 2"]),  # default n_samples is 1
    *[
        ([f"ppo.{k}=0"], [f"ppo.{k} must be >= 1"])
        for k in ("n_samples", "ppo_epochs", "num_minibatches", "kl_horizon", "ptx_batch_size")
    ],
    *[
        ([f"ppo.{k}={v}"], [f"ppo.{k} must be finite and >= 0", f"got {r}"])
        for k in ("clip_low", "clip_high", "entropy_coef", "kl_coef", "ptx_coef", "truncation_penalty")
        for v, r in ((".nan", "nan"), (".inf", "inf"), ("-1", "-1.0"))
    ],
    (["ppo.critic_warmup_iterations=-1"], ["ppo.critic_warmup_iterations must be finite and >= 0"]),
    (["ppo.clip_low=1"], ["ppo.clip_low must be < 1", "got 1.0"]),
    (["ppo.clip_low=1.5"], ["ppo.clip_low must be < 1"]),
    *[([f"ppo.dual_clip={v}"], ["ppo.dual_clip must be > 1"]) for v in ("1", "0.5", ".nan", ".inf")],
    *[
        ([f"ppo.{k}={v}"], [f"ppo.{k} must be > 0"])
        for k in ("value_clip", "reward_clip", "kl_target", "loss_agg_constant")
        for v in ("0", "-0.1", ".nan")
    ],
    (["ppo.gamma=1.01"], ["ppo.gamma"]),
    (["ppo.gamma=-0.1"], ["ppo.gamma"]),
    (["ppo.gamma=.nan"], ["ppo.gamma"]),
    (["ppo.lam=1.5"], ["ppo.lam"]),
    (["ppo.lam=-0.5"], ["ppo.lam"]),
    (["ppo.group_eps=0"], ["ppo.group_eps"]),
    (["ppo.group_eps=1"], ["ppo.group_eps"]),
    (["ppo.truncation_warn=1.5"], ["ppo.truncation_warn"]),
    (["ppo.loss_agg=sum"], ["ppo.loss_agg", "'sum'"]),
    (["ppo.kl_estimator=k4"], ["ppo.kl_estimator", "'k4'"]),
    (["ppo.kl_placement=advantage"], ["ppo.kl_placement", "'advantage'"]),
    (["ppo.kl_controller=pid"], ["ppo.kl_controller", "'pid'"]),
    (["ppo.kl_controller=adaptive"], ["ppo.kl_controller=adaptive needs ppo.kl_target"]),
    (["ppo.truncation=drop"], ["ppo.truncation", "'drop'"]),
    (["ppo.ptx_coef=0.1"], ["ppo.ptx_coef > 0 needs ppo.ptx_path"]),
    (["ppo.ema_decay=1.0"], ["ppo.ema_decay must be in [0, 1)", "got 1.0"]),
    (["ppo.ema_decay=-0.1"], ["ppo.ema_decay"]),
    (["training.max_consecutive_skips=0"], ["training.max_consecutive_skips must be >= 1", "got 0"]),
]


@pytest.mark.parametrize("overrides,needles", BAD_PPO, ids=[" ".join(o) for o, _ in BAD_PPO])
def test_ppo_section_refuses(overrides: list[str], needles: list[str]) -> None:
    msg = config_error(overrides)
    key, _, value = overrides[-1].partition("=")
    if value in (".nan", ".inf"):  # every float field is refused non-finite while the config is read, naming it
        needles = [f"'{key}' must be a finite number"]
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["ppo.estimator=grpo", "ppo.n_samples=2"],
        ["ppo.estimator=rloo", "ppo.n_samples=4"],
        ["ppo.estimator=reinforce++"],
        ["ppo.clip_low=0.99", "ppo.clip_high=3", "ppo.dual_clip=1.01"],
        ["ppo.dual_clip=null", "ppo.value_clip=null", "ppo.reward_clip=null"],
        ["ppo.gamma=0", "ppo.lam=1"],
        ["ppo.gamma=1", "ppo.lam=0"],
        ["ppo.kl_coef=0", "ppo.entropy_coef=0", "ppo.clip_low=0"],
        ["ppo.kl_controller=adaptive", "ppo.kl_target=0.05"],
        ["ppo.ptx_coef=0.1", "ppo.ptx_path=/some/sft.jsonl"],
        ["ppo.ema_decay=0.999"],
        ["training.max_consecutive_skips=1"],
    ],
)
def test_ppo_section_accepts(overrides: list[str]) -> None:
    load_config(None, overrides)


def test_ppo_defaults() -> None:
    p = load_config(None, []).ppo
    assert p.estimator == "gae" and p.needs_critic
    assert not load_config(None, ["ppo.estimator=grpo", "ppo.n_samples=2"]).ppo.needs_critic


def ppo_cfg(*extra: str):
    return load_config(None, list(extra))


def test_validate_world_ppo_prompts_not_divisible_by_dp() -> None:
    cfg = ppo_cfg("training.global_batch_size=6", "training.micro_batch_size=1")
    with pytest.raises(ConfigError) as info:
        cfg.validate_world(4, "ppo")
    msg = str(info.value)
    assert "training.global_batch_size (6 prompts per PPO iteration)" in msg and "dp (4)" in msg


def test_validate_world_ppo_minibatches_not_splitting() -> None:
    # 8 prompts x 2 samples / dp 2 = 8 sequences per rank; 3 minibatches do not divide 8
    cfg = ppo_cfg(
        "training.global_batch_size=8", "ppo.n_samples=2", "ppo.num_minibatches=3", "training.micro_batch_size=1"
    )
    with pytest.raises(ConfigError) as info:
        cfg.validate_world(2, "ppo")
    msg = str(info.value)
    assert "8 prompts x ppo.n_samples 2 / dp 2 = 8 sequences per rank" in msg, msg
    assert "ppo.num_minibatches (3)" in msg and "training.micro_batch_size 1" in msg


def test_validate_world_ppo_minibatch_not_whole_microbatches() -> None:
    # 8 x 2 / 2 = 8 per rank, 2 minibatches of 4, microbatch 3 does not divide 4
    cfg = ppo_cfg(
        "training.global_batch_size=8", "ppo.n_samples=2", "ppo.num_minibatches=2", "training.micro_batch_size=3"
    )
    with pytest.raises(ConfigError) as info:
        cfg.validate_world(2, "ppo")
    msg = str(info.value)
    assert "= 8 sequences per rank" in msg and "ppo.num_minibatches (2)" in msg and "micro_batch_size 3" in msg


def test_validate_ppo_batches_ptx_batch_size_vs_dp() -> None:
    ptx = ("ppo.ptx_coef=0.1", "ppo.ptx_path=/x.jsonl", "ppo.ptx_batch_size=3")
    cfg = ppo_cfg("training.global_batch_size=8", "training.micro_batch_size=1", *ptx)
    with pytest.raises(ConfigError) as info:
        cfg.validate_ppo_batches(2)
    assert "ppo.ptx_batch_size (3)" in str(info.value) and "dp (2)" in str(info.value)
    cfg.validate_ppo_batches(1)  # 3 splits over one rank
    # without ptx the ptx batch size is not checked
    ppo_cfg("training.global_batch_size=8", "training.micro_batch_size=1", "ppo.ptx_batch_size=3").validate_ppo_batches(
        2
    )


def test_old_logprobs_source_is_validated() -> None:
    assert ppo_cfg().ppo.old_logprobs == "recompute"  # exact by default
    assert ppo_cfg("ppo.old_logprobs=rollout").ppo.old_logprobs == "rollout"
    with pytest.raises(ConfigError, match="ppo.old_logprobs must be recompute or rollout, got 'generate'"):
        ppo_cfg("ppo.old_logprobs=generate")


def test_validate_world_ppo_accepts_fewer_prompts_than_micro_batch() -> None:
    # 4 prompts x 4 samples = 16 sequences per iteration; microbatches of 8 sequences: valid for PPO ...
    cfg = ppo_cfg("training.global_batch_size=4", "ppo.n_samples=4", "training.micro_batch_size=8")
    assert cfg.validate_world(1, "ppo") == 1
    # ... while the sample-count rule of the other stages would refuse it (4 is not a multiple of 8)
    with pytest.raises(ConfigError, match="global_batch_size"):
        cfg.validate_world(1)


def test_validate_world_ppo_returns_dp_and_checks_layout() -> None:
    cfg = ppo_cfg("parallel.tp=2", "training.global_batch_size=16", "ppo.n_samples=2", "ppo.num_minibatches=2",
                  "training.micro_batch_size=4")  # fmt: skip
    assert cfg.validate_world(4, "ppo") == 2  # 16 / 2 * 2 = 16 per rank, 2 minibatches of 8 = 2 microbatches of 4
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        cfg.validate_world(3, "ppo")


# ---- plot --------------------------------------------------------------------------------------------------------


def write_run(tmp_path: Path, records: list[dict] | None = None, text: str | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    body = text if text is not None else "".join(json.dumps(r) + "\n" for r in records or [])
    (run / "metrics.jsonl").write_text(body, encoding="utf-8")
    return run


PPO_RECORDS = [
    {"iteration": i, "reward_raw_mean": 0.1 * i, "kl_per_sequence": 0.01 * i, "pg_loss": -0.02 * i,
     "value_loss": 1.0 / i, "response_length": 8.0 + i, "time_generate_s": 0.5, "note": "text is ignored"}
    for i in range(1, 4)
]  # fmt: skip


def test_plot_ppo_run_writes_one_png_per_present_group(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from mrlhf.plot import plot_run

    run = write_run(tmp_path, PPO_RECORDS)
    written = plot_run(str(run))
    names = sorted(Path(p).name for p in written)
    # groups with at least one metric of the run; logprob_mismatch has none
    assert names == ["critic.png", "kl.png", "policy.png", "responses.png", "reward.png", "time.png"]
    for p in written:
        assert Path(p).parent == run / "plots"
        assert Path(p).read_bytes()[:8] == PNG_MAGIC


# One PPO record per iteration with the newer metrics: spreads, KL per token, skip counts, the reward function's time.
FULL_PPO_RECORDS = [
    {"iteration": i, "reward_raw_mean": 0.1 * i, "reward_raw_std": 0.5, "reward_mean": 0.2 * i, "reward_std": 1.0,
     "kl_per_sequence": 0.01 * i, "kl_per_token": 0.001 * i, "kl_coef": 0.05, "logprob_mismatch_max": 1e-6,
     "skipped_steps": 0.0, "skipped_steps_total": 0.0, "time_generate_s": 0.5, "time_reward_function_s": 0.01,
     "time_train_s": 0.7, "dropped_samples": 0.0}
    for i in range(1, 3)
]  # fmt: skip


def test_plot_groups_of_a_ppo_run_include_spreads_skips_and_reward_function_time() -> None:
    from mrlhf.plot import figure_groups

    x_key, groups = figure_groups(FULL_PPO_RECORDS)
    assert x_key == "iteration"
    # in GROUPS order; metrics the records lack (entropy, time_experience_s, ...) are left out, as are whole figures
    assert groups == {
        "reward": ["reward_raw_mean", "reward_raw_std", "reward_mean", "reward_std"],
        "kl": ["kl_per_sequence", "kl_per_token", "kl_coef"],
        "logprob_mismatch": ["logprob_mismatch_max"],
        "skipped": ["skipped_steps", "skipped_steps_total"],
        "time": ["time_generate_s", "time_reward_function_s", "time_train_s"],
    }


def test_plot_groups_leave_out_absent_metrics() -> None:
    from mrlhf.plot import figure_groups

    # a reward-model run: no time_reward_function_s; critic warm-up: no policy metrics
    records = [{"iteration": 1, "reward_raw_mean": 0.3, "time_generate_s": 0.5, "skipped_steps_total": 0.0}]
    assert figure_groups(records) == (
        "iteration",
        {"reward": ["reward_raw_mean"], "skipped": ["skipped_steps_total"], "time": ["time_generate_s"]},
    )


def test_plot_groups_of_other_stages_stay_one_per_metric() -> None:
    from mrlhf.plot import figure_groups

    # SFT/RM/DPO records carry skipped_steps_total too; they are keyed by step, not grouped like PPO
    records = [{"step": 1, "loss": 2.0, "skipped_steps_total": 0, "consumed_samples": 8}]
    assert figure_groups(records) == ("step", {"loss": ["loss"], "skipped_steps_total": ["skipped_steps_total"]})


def test_plot_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from mrlhf.cli import main

    run = write_run(tmp_path, FULL_PPO_RECORDS)
    assert main(["plot", str(run)]) == 0
    names = ["kl.png", "logprob_mismatch.png", "reward.png", "skipped.png", "time.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == names
    for name in names:
        assert (run / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out.split()  # one path per written figure
    assert sorted(Path(p).name for p in printed) == names


def test_plot_non_ppo_run_one_png_per_metric(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from mrlhf.plot import plot_run

    records = [
        {"step": s, "loss": 2.0 / s, "lr": 1e-3, "mem_allocated": 100, "consumed_samples": 8 * s} for s in (1, 2)
    ]
    run = write_run(tmp_path, records)
    out = tmp_path / "figs"
    written = plot_run(str(run), str(out))
    assert sorted(Path(p).name for p in written) == ["loss.png", "lr.png"]  # mem_* and consumed* are left out
    for p in written:
        assert Path(p).parent == out and Path(p).read_bytes()[:8] == PNG_MAGIC


def test_plot_bad_json_line_names_file_line_and_column(tmp_path: Path) -> None:
    from mrlhf.plot import plot_run

    # line 2 is blank (skipped, still counted); line 3 is broken at column 10: {"step": }
    run = write_run(tmp_path, text='{"step": 1, "loss": 2.0}\n\n{"step": }\n')
    with pytest.raises(DataError) as info:
        plot_run(str(run))
    msg = str(info.value)
    assert msg.startswith(f"{run / 'metrics.jsonl'}:3: "), msg
    assert "column 10" in msg, msg
    assert info.value.line == 3


def test_plot_record_that_is_not_an_object(tmp_path: Path) -> None:
    from mrlhf.plot import plot_run

    run = write_run(tmp_path, text='{"step": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: a metrics record must be a JSON object"):
        plot_run(str(run))


def test_plot_empty_metrics_file(tmp_path: Path) -> None:
    from mrlhf.plot import plot_run

    run = write_run(tmp_path, text="\n\n")
    with pytest.raises(DataError, match="no metrics records"):
        plot_run(str(run))


def test_plot_missing_metrics_file(tmp_path: Path) -> None:
    from mrlhf.plot import plot_run

    with pytest.raises(DataError) as info:
        plot_run(str(tmp_path))
    assert str(tmp_path / "metrics.jsonl") in str(info.value) and "not found" in str(info.value)


# ---- `mrlhf ppo` user errors -------------------------------------------------------------------------------------


def error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mrlhf: error:"), lines[0]
    return lines[0]


def test_cli_ppo_bad_estimator(capsys, tmp_path: Path) -> None:
    from mrlhf.cli import main

    code = main(["ppo", "--config", PPO_YAML, "ppo.estimator=nope", f"training.output_dir={tmp_path / 'out'}"])
    line = error_line(capsys, code)
    assert "ppo.estimator" in line and "'nope'" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture
def world1_env(monkeypatch):
    """What a world-1 process group reads (the CLI would set it in os.environ for good); restored afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)


def run_ppo_past_the_data_check(tmp_path: Path, *overrides: str) -> int:
    from mrlhf.cli import main

    common = [f"training.output_dir={tmp_path / 'out'}", "data.cache_dir=null", "logging.progress_bar=false",
              "parallel.backend=gloo"]  # fmt: skip
    code = main(["ppo", "--config", PPO_YAML, *common, *overrides])
    import torch.distributed as dist

    assert not dist.is_initialized()  # the CLI tore its process group down
    return code


def test_cli_ppo_missing_actor_checkpoint(capsys, tmp_path: Path, world1_env) -> None:
    """The load directory is only read once the roles are built (after a 1-process gloo group started): still one
    line naming the path, exit code 2."""
    code = run_ppo_past_the_data_check(tmp_path, "ppo.actor_load_dir=/nonexistent", "ppo.critic_load_dir=null")
    line = error_line(capsys, code)
    assert "/nonexistent" in line and "ppo.actor_load_dir" in line, line


def test_cli_ppo_greedy_generation_is_refused(capsys, tmp_path: Path, world1_env) -> None:
    # generation.temperature=0 is valid for `mrlhf generate` (greedy) but not for PPO, which needs sampled log-probs
    code = run_ppo_past_the_data_check(tmp_path, "generation.temperature=0", "ppo.critic_load_dir=null")
    line = error_line(capsys, code)
    assert "generation.temperature > 0" in line, line


def test_cli_ppo_unimportable_reward_function_is_refused_before_start_up(capsys, tmp_path: Path) -> None:
    from mrlhf.cli import main

    code = main(["ppo", "--config", PPO_YAML, "ppo.reward_function=no_such_rewards_mod:score",
                 f"training.output_dir={tmp_path / 'out'}"])  # fmt: skip
    line = error_line(capsys, code)
    assert "ppo.reward_function=no_such_rewards_mod:score: cannot import module 'no_such_rewards_mod'" in line, line
    assert not (tmp_path / "out").exists()


def test_cli_ppo_config_errors_exit_2_for_every_bad_field(capsys) -> None:
    from mrlhf.cli import main

    for override, field in (("ppo.kl_coef=.nan", "ppo.kl_coef"), ("ppo.ema_decay=1.0", "ppo.ema_decay"),
                            ("ppo.clip_low=1", "ppo.clip_low")):  # fmt: skip
        line = error_line(capsys, main(["ppo", "--config", PPO_YAML, override]))
        assert field in line, (override, line)
        assert PPO_YAML in line  # the source is named


def test_nan_is_really_parsed_as_nan() -> None:
    # the override parser reads .nan as a float NaN: the kl_coef refusal above is the finiteness branch
    from mrlhf.config import apply_overrides

    assert math.isnan(apply_overrides({}, ["ppo.kl_coef=.nan"])["ppo"]["kl_coef"])
