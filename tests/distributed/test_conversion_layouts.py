"""HF <-> mrlhf conversion at every layout, checked against transformers itself.

HF -> mrlhf at TP1, TP2, PP2 and TP2xPP2 gives the transformers model's logits (1e-5, fp32) and its greedy
continuation; a reward model gives its score; TP2xPP2 -> TP1PP1 -> TP2xPP2 resharding is bit-exact; an EMA actor
exports next to the actor and both load in transformers.
"""

import os

import pytest
import torch
from harness import run_ranks
from model_runs import full_logits_on_last_stage, make_cfg

from mrlhf.convert import runtime
from mrlhf.convert.export_hf import convert_mrlhf_to_hf
from mrlhf.convert.import_hf import convert_hf_to_mrlhf
from mrlhf.convert.reshard import reshard_checkpoint
from mrlhf.convert.tiny import tiny_hf_model

transformers = pytest.importorskip("transformers")

TOL = 1e-5
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf_tokenizer")


def tokens(b: int = 3, s: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 300, (b, s), generator=torch.Generator().manual_seed(seed))  # no pad id (0)


def load_role(out: str, role: str, source_role: str | None = None):
    """(cfg, model) of ``role`` from a checkpoint, built on this rank at the layout the world size allows (the
    checkpoint's own, or TP1PP1 in a world of one)."""
    from megatron.core import parallel_state as ps

    from mrlhf import checkpoint as ckpt
    from mrlhf.convert.export_hf import checkpoint_config, real_vocab
    from mrlhf.models.roles import RoleModel
    from mrlhf.parallel.state import init_distributed

    path = ckpt.latest_checkpoint(out)
    meta = ckpt.read_meta(path)
    single = int(os.environ["WORLD_SIZE"]) == 1
    cfg = checkpoint_config(meta, 1 if single else meta["layout"]["tp"], 1 if single else meta["layout"]["pp"])
    if not torch.distributed.is_initialized():
        init_distributed(cfg)
    model = RoleModel(cfg, role, real_vocab(cfg, path), ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    ckpt.load_model(path, role, model, source_role=source_role)
    return cfg, model.eval()


def actor_outputs(rank: int, out: str, prompts: list[list[int]]) -> dict:
    """Gathered logits on the fixed tokens (last stage) and greedy continuations of ``prompts`` (every rank)."""
    from mrlhf.generation.generate import GenerationConfig, Generator
    from mrlhf.generation.sampling import SamplingParams

    cfg, model = load_role(out, "actor")
    t = tokens()
    batch = {"tokens": t, "position_ids": torch.arange(t.shape[1]).expand_as(t), "attention_mask": t > 0}
    logits = full_logits_on_last_stage(model, batch, cfg)
    gen = GenerationConfig(max_new_tokens=8, sampling=SamplingParams(temperature=0.0), micro_batch_size=len(prompts))
    return {"logits": logits, "tokens": Generator(model, gen, pad_id=0).generate(prompts).tokens}


def reward_outputs(rank: int, out: str) -> torch.Tensor | None:
    from mrlhf.parallel.schedule import forward_only

    cfg, model = load_role(out, "reward")
    t = tokens()
    mb = {"tokens": t, "position_ids": torch.arange(t.shape[1]).expand_as(t), "attention_mask": t > 0}
    res = forward_only(model, [mb], lambda o, _: o.detach(), cfg.model.hidden_size, torch.float32, torch.device("cpu"))
    return res[0] if res else None


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_hf_to_mrlhf_matches_transformers_at_every_layout(kind, tmp_path):
    hf_dir = str(tmp_path / "hf")
    hf = tiny_hf_model(kind, hf_dir, tokenizer_dir=TOKENIZER)
    hf.generation_config.eos_token_id = None  # our generator runs without stop tokens here
    prompts = tokens(2, 5, seed=11)
    with torch.no_grad():
        want = hf(tokens()).logits
        want_gen = hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=8, pad_token_id=0
        )[:, prompts.shape[1] :].tolist()
    for tp, pp in LAYOUTS:
        out = str(tmp_path / f"tp{tp}pp{pp}")
        convert_hf_to_mrlhf(hf_dir, out, tp=tp, pp=pp)
        results = run_ranks(actor_outputs, tp * pp, out, prompts.tolist())
        last = [r for r in results if r["logits"] is not None]
        assert len(last) == tp
        for r in last:
            err = float((r["logits"] - want).abs().max())
            assert err <= TOL, f"{kind} tp={tp} pp={pp}: max logit error {err}"
        for r in results:
            assert r["tokens"] == want_gen, f"{kind} tp={tp} pp={pp}: greedy continuation differs"


def test_reward_model_tp2pp2_matches_transformers_score(tmp_path):
    hf_dir = str(tmp_path / "hf")
    hf = tiny_hf_model("llama_rm", hf_dir)
    with torch.no_grad():
        want = hf(tokens()).logits[:, 0]
    out = str(tmp_path / "rm")
    summary = convert_hf_to_mrlhf(hf_dir, out, tp=2, pp=2)
    assert summary["role"] == "reward"
    got = [r for r in run_ranks(reward_outputs, 4, out) if r is not None]
    assert len(got) == 2
    for r in got:
        assert (r - want).abs().max() <= TOL


def save_two_roles(rank: int, out: str, layout: dict, roles: dict[str, tuple[str, int]]) -> None:
    """A trainer-style checkpoint at ``layout`` holding several roles (name -> (model kind, seed)). Run with the
    library's ``runtime.run_ranks``: its ranks exit normally, so the writer process each save spawns ends too."""
    from mrlhf import checkpoint as ckpt
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed

    cfg = make_cfg(layout, [])
    init_distributed(cfg)
    models = {name: build_role(cfg, kind, 384, seed=seed) for name, (kind, seed) in roles.items()}
    ckpt.save_checkpoint(out, 7, models, {}, {"step": 7, "consumed_samples": 56}, cfg.to_dict(), "h")


def compare_checkpoints(rank: int, a: str, b: str, roles: dict[str, str]) -> int:
    """Load both checkpoints at the current layout; every parameter must be bitwise equal. Returns the count."""
    n = 0
    for name, kind in roles.items():
        _, ma = load_role(a, kind, source_role=name)
        _, mb = load_role(b, kind, source_role=name)
        pb = dict(mb.named_parameters())
        for key, p in ma.named_parameters():
            assert torch.equal(p, pb[key]) and p.dtype == pb[key].dtype, f"{name}.{key} differs"
            n += 1
    return n


def test_reshard_tp2pp2_to_tp1_and_back_is_bitwise(tmp_path):
    src, mid, back = (str(tmp_path / n) for n in ("src", "tp1", "back"))
    roles = {"actor": ("actor", 1), "critic": ("critic", 2)}
    runtime.run_ranks(save_two_roles, 4, src, {"tp": 2, "pp": 2}, roles)
    reshard_checkpoint(src, mid, tp=1, pp=1)
    reshard_checkpoint(mid, back, tp=2, pp=2)
    kinds = {name: kind for name, (kind, _) in roles.items()}
    assert all(n > 0 for n in run_ranks(compare_checkpoints, 4, src, back, kinds))
    assert run_ranks(compare_checkpoints, 1, src, mid, kinds)[0] > 0  # and the TP1PP1 middle step is exact too
    from mrlhf.checkpoint import latest_checkpoint, read_meta

    meta = read_meta(latest_checkpoint(back))
    assert meta["layout"]["tp"] == 2 and meta["step"] == 7 and meta["train_state"]["consumed_samples"] == 56


def actor_and_ema_logits(rank: int, out: str) -> dict:
    t = tokens(2, 7)
    batch = {"tokens": t, "position_ids": torch.arange(7).expand_as(t), "attention_mask": t > 0}
    cfg, actor = load_role(out, "actor")
    _, ema = load_role(out, "actor", source_role="ema_actor")
    return {"actor": full_logits_on_last_stage(actor, batch, cfg), "ema": full_logits_on_last_stage(ema, batch, cfg)}


def test_export_actor_and_ema_from_tp2pp2_load_in_transformers(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    runtime.run_ranks(save_two_roles, 4, ckpt, {"tp": 2, "pp": 2}, {"actor": ("actor", 1), "ema_actor": ("actor", 2)})
    summary = convert_mrlhf_to_hf(ckpt, out)
    assert set(summary["files"]) == {"actor", "ema_actor"}
    (want,) = run_ranks(actor_and_ema_logits, 1, ckpt)
    t = tokens(2, 7)
    for sub, key in (("", "actor"), ("ema", "ema")):
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, sub)).eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            assert (hf(t).logits - want[key]).abs().max() <= TOL
    assert (want["actor"] - want["ema"]).abs().max() > 1e-2
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))  # the run's sentencepiece model travels along
