"""Rank functions of the PPO head tests: vocab-parallel entropy and log-probs on fixed logits, and an actor's
tempered log-probs and entropy. The fixed inputs live here so the test computes its float64 references from the very
same values."""

from __future__ import annotations

import torch
from model_runs import fixed_batch, full_logits_on_last_stage
from sft_runs import TINY

S, B, V = 5, 3, 16  # [s, b, V] logits; V/2 = 8 columns per rank at TP2
REAL = 13  # columns 13..15 are vocabulary padding (-inf), all on the second TP rank
TINY_LOGIT = (0, 1, 2)  # (s, b, column) set 3e4 below everything: contributes exactly nothing
MODEL_VOCAB = 380  # padded to 384: the last 4 columns are padding


def head_logits(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(S, B, V, generator=g)
    logits[..., REAL:] = float("-inf")
    s, b, c = TINY_LOGIT
    logits[s, b, c] = -3e4
    return logits


def entropy_weight(seed: int = 4) -> torch.Tensor:
    return torch.randn(B, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def head_targets(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, REAL, (B, S), generator=torch.Generator().manual_seed(seed))


def _init(tp: int):
    from megatron.core import parallel_state as ps

    from mrlhf.config import load_config
    from mrlhf.parallel.state import init_distributed

    cfg = load_config(TINY, [f"parallel.tp={tp}"])
    init_distributed(cfg)
    assert ps.get_tensor_model_parallel_world_size() == tp
    return cfg, ps.get_tensor_model_parallel_rank()


def entropy_rank(rank: int, tp: int) -> dict:
    """This rank's vocab slice -> entropy [b, s] and the gradient of sum(entropy * w) w.r.t. the slice."""
    from mrlhf.models.heads import vocab_parallel_entropy

    _, tp_rank = _init(tp)
    local = head_logits().chunk(tp, dim=-1)[tp_rank].clone().requires_grad_(True)
    ent = vocab_parallel_entropy(local)
    (ent * entropy_weight().float()).sum().backward()
    return {"tp_rank": tp_rank, "entropy": ent.detach(), "grad": local.grad.clone()}


def logprobs_rank(rank: int, tp: int) -> dict:
    """token_logprobs on this rank's slice, fp32 and bf16; whether the input survived bitwise."""
    from mrlhf.models.heads import token_logprobs

    _, tp_rank = _init(tp)
    out = {"tp_rank": tp_rank}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        local = head_logits().chunk(tp, dim=-1)[tp_rank].to(dtype).contiguous()
        before = local.clone()
        lp = token_logprobs(local, head_targets())
        out[name] = {"logprobs": lp, "unchanged": torch.equal(local, before), "dtype": lp.dtype}
    return out


def actor_rank(rank: int, tp: int) -> dict:
    """An actor's (log-probs, entropy) at temperature 0.7 and log-probs at 1.0, the full logits the same weights give
    through vocab_parallel_logits (gathered over TP), and what set_lm_output says to temperatures <= 0."""
    from mrlhf.models.roles import build_role

    cfg, tp_rank = _init(tp)
    model = build_role(cfg, "actor", MODEL_VOCAB, seed=5)
    batch = fixed_batch(MODEL_VOCAB)
    args = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    out = {"tp_rank": tp_rank, "labels": batch["labels"], "refused": {}}
    with torch.no_grad():
        model.set_lm_output(temperature=0.7, entropy=True)
        lp, ent = model(*args, targets=batch["labels"])
        out["lp07_from3"], out["entropy07_from3"] = model(*args, targets=batch["labels"], logits_from=torch.tensor(3))
        model.set_lm_output(temperature=1.0)
        out["lp1"] = model(*args, targets=batch["labels"])
    out["lp07"], out["entropy07"] = lp, ent
    out["logits"] = full_logits_on_last_stage(model, batch, cfg)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        try:
            model.set_lm_output(temperature=t, entropy=True)
            out["refused"][str(t)] = None
        except ValueError as e:
            out["refused"][str(t)] = str(e)
    out["after_refusal"] = (model.lm_temperature, model.lm_entropy)
    return out
