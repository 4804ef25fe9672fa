"""Rank functions for generation tests."""

from __future__ import annotations

import torch
from model_runs import make_cfg


def prompts(n: int = 7, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 3, 7, 6, 11, 4, 8, 2, 10][:n]
    return [torch.randint(4, 384, (k,), generator=g).tolist() for k in lengths]


def generate_rank(rank: int, layout: dict[str, int], flavour: str, sampling: dict, extra: dict) -> dict:
    from mrlhf.generation.generate import GenerationConfig, Generator, generate_full_recompute
    from mrlhf.generation.sampling import SamplingParams
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed

    flags = [f"model.flavour={flavour}"] + (["model.num_query_groups=null"] if flavour == "gpt2" else [])
    cfg = make_cfg(layout, flags + extra.get("overrides", []))
    init_distributed(cfg)
    model = build_role(cfg, "actor", 384, seed=3)
    gen = GenerationConfig(
        max_new_tokens=extra.get("max_new_tokens", 10),
        sampling=SamplingParams(**sampling),
        micro_batch_size=extra.get("micro_batch_size", 2),
        stop_token_ids=tuple(extra.get("stop", ())),
        num_slots=extra.get("num_slots"),
        stop_strings=tuple(extra.get("stop_strings", ())),
    )
    ps_ = prompts(extra.get("n", 7))
    out = Generator(
        model,
        gen,
        pad_id=0,
        decode_text=letters,
        fast_decode=extra.get("fast", True),
        fused_linear=extra.get("fused", True),
    ).generate(ps_)
    result = {"tokens": out.tokens, "logprobs": out.logprobs, "reasons": out.finish_reasons, "stats": out.stats}
    if extra.get("reference"):
        ref = generate_full_recompute(model, ps_, gen, pad_id=0)
        result["ref_tokens"], result["ref_logprobs"] = ref.tokens, ref.logprobs
    if extra.get("train_logprobs"):
        result["train_logprobs"] = training_logprobs(model, cfg, ps_, out.tokens, gen.sampling.temperature or 1.0)
    return result


def cli_rank(rank: int, argv: list[str]) -> int:
    """`mrlhf ARGV` on this rank, the real command line."""
    from mrlhf.cli import main

    return main(argv)


def letters(ids: list[int]) -> str:
    """A stand-in detokenizer for stop-string tests: one letter per id."""
    return "".join(chr(65 + i % 26) for i in ids)


def training_logprobs(model, cfg, prompts_, generated, temperature: float):
    """Log-probs of the generated tokens from a training-mode forward of each finished sequence (right-padded)."""
    from megatron.core import parallel_state as ps

    from mrlhf.data.collate import collate_sft
    from mrlhf.parallel.schedule import forward_only

    items = [(p + g, [0] * len(p) + [1] * len(g)) for p, g in zip(prompts_, generated)]
    batch = collate_sft(items, 0)
    model.eval()

    assert temperature == 1.0  # the training forward computes log-probs at temperature 1
    res = forward_only(model, [batch], lambda lp, mb: lp, cfg.model.hidden_size, torch.float32, torch.device("cpu"))
    if not ps.is_pipeline_last_stage():
        return None
    lp = res[0]
    return [lp[i, len(p) - 1 : len(p) - 1 + len(g)].tolist() for i, (p, g) in enumerate(zip(prompts_, generated))]
