"""The one record PPO moves between phases: a DP rank's rollout batch and everything computed about it.

Layout: row ``i`` is one sampled sequence, prompt then response, right-padded to the iteration's width ``W`` (the
longest prompt + response over every DP rank, so all microbatches of all passes share one shape). Training follows
the next-token convention: position ``t`` reads ``tokens[:, :t+1]`` and is scored on ``labels[:, t] = tokens[:, t+1]``.
A response of ``L`` tokens after a prompt of ``P`` tokens occupies label positions ``[P-1, P-1+L)``: that span is
``action_mask``. Values at position ``t`` are the critic's estimate of the state before action ``t``.

Fields are grouped by the phase that fills them: rollout (generation), scoring (forward-only passes of the four
roles), then advantages. Score-phase fields exist only on the last pipeline stage (that is where heads run); the
first stages keep just what the schedule needs (tokens, positions, masks).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

HOST_FIELDS = ("response_start",)


@dataclass
class Experience:
    # -- rollout: every stage ---------------------------------------------------------------------------------------
    tokens: torch.Tensor
    """[b, W] int64 prompt + response, right-padded with pad ids."""
    position_ids: torch.Tensor
    """[b, W] int64 positions 0..n-1 of the real tokens."""
    attention_mask: torch.Tensor
    """[b, W] bool, True on real tokens."""
    labels: torch.Tensor
    """[b, W] int64 next tokens (pad where there is none)."""
    action_mask: torch.Tensor
    """[b, W] float32, 1 on label positions that are response tokens."""
    seq_ids: torch.Tensor
    """[b] int64 global sequence ids (prompt index * n_samples + sample)."""
    prompt_index: torch.Tensor
    """[b] int64 index of the prompt in the prompt dataset."""
    response_length: torch.Tensor
    """[b] int64 generated tokens (EOS included)."""
    truncated: torch.Tensor
    """[b] bool, the response hit max_new_tokens without EOS."""
    rollout_logprobs: torch.Tensor
    """[b, W] float32 log-probs the sampler reported for each action (0 elsewhere)."""
    response_start: torch.Tensor
    """[b] int64 label position of the first response token (prompt length - 1). Stays on the host (``to`` leaves
    it), so microbatching reads it without a device sync."""
    # -- scoring: last stage ----------------------------------------------------------------------------------------
    old_logprobs: torch.Tensor | None = None
    """[b, W] actor log-probs at rollout time (the PPO ratio's denominator)."""
    ref_logprobs: torch.Tensor | None = None
    """[b, W] reference log-probs."""
    values: torch.Tensor | None = None
    """[b, W] critic values at rollout time (GAE only)."""
    scores: torch.Tensor | None = None
    """[b] reward-model scores after normalisation, clipping and the truncation policy."""
    raw_scores: torch.Tensor | None = None
    """[b] reward-model scores as the model gave them."""
    # -- advantages: last stage -------------------------------------------------------------------------------------
    valid: torch.Tensor | None = None
    """[b] bool, the reward was finite (a False row is left out of every loss and statistic)."""
    loss_mask: torch.Tensor | None = None
    """[b, W] float32 action positions that enter the actor loss (action_mask minus dropped/masked rows)."""
    critic_mask: torch.Tensor | None = None
    """[b, W] float32 action positions that enter the value loss (action_mask minus dropped rows)."""
    kl: torch.Tensor | None = None
    """[b, W] per-token KL estimate to the reference."""
    advantages: torch.Tensor | None = None
    """[b, W] advantages (0 outside the loss mask)."""
    returns: torch.Tensor | None = None
    """[b, W] value targets (GAE only)."""

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device) -> Experience:
        """Every tensor field on ``device`` (a new record; tensors already there are shared)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = None if v is None else v if f.name in HOST_FIELDS else v.to(device)
        return Experience(**moved)

    def select(self, rows: torch.Tensor) -> Experience:
        """The rows ``rows`` [k] of every field, as a new record."""
        picked = {}
        for f in fields(self):
            v = getattr(self, f.name)
            picked[f.name] = None if v is None else v[rows.to(v.device)]
        return Experience(**picked)

    def microbatches(self, rows: torch.Tensor, size: int, keys: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
        """Schedule microbatches of ``size`` rows each over ``rows`` (in order), carrying the schedule's inputs and
        ``keys`` (fields that must be set). ``logits_from`` (0-dim, host) is the microbatch's first response position:
        LM heads compute no logits before it (the prompt's), and return 0 there."""
        out = []
        for start in range(0, rows.numel(), size):
            part = rows[start : start + size]
            mb = {
                "tokens": self.tokens[part],
                "position_ids": self.position_ids[part],
                "attention_mask": self.attention_mask[part],
                "labels": self.labels[part],
                "logits_from": self.response_start[part.cpu()].min(),
            }
            for key in keys:
                value = getattr(self, key)
                if value is None:
                    raise ValueError(f"Experience.{key} is not set (phase order?)")
                mb[key] = value[part]
            out.append(mb)
        return out


def build_rollout(
    prompts: list[list[int]],
    responses: list[list[int]],
    response_logprobs: list[list[float]],
    truncated: list[bool],
    seq_ids: list[int],
    prompt_index: list[int],
    width: int,
    pad_id: int,
    device: torch.device,
) -> Experience:
    """Rollout fields from the generator's output: one row per (prompt, response), right-padded to ``width``."""
    b = len(prompts)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.bool)
    actions = torch.zeros((b, width), dtype=torch.float32)
    rollout_lp = torch.zeros((b, width), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, response_logprobs)):
        seq = list(p) + list(r)
        n, start = len(seq), len(p) - 1
        if n > width:
            raise ValueError(f"sequence of {n} tokens does not fit the rollout width {width}")
        tokens[i, :n] = torch.tensor(seq, dtype=torch.long)
        labels[i, : n - 1] = tokens[i, 1:n]
        attention[i, :n] = True
        actions[i, start : start + len(r)] = 1.0
        rollout_lp[i, start : start + len(r)] = torch.tensor(lp, dtype=torch.float32)
    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).repeat(b, 1)  # [W] -> [b, W]
    exp = Experience(
        tokens=tokens,
        position_ids=positions,
        attention_mask=attention,
        labels=labels,
        action_mask=actions,
        seq_ids=torch.tensor(seq_ids, dtype=torch.long),
        prompt_index=torch.tensor(prompt_index, dtype=torch.long),
        response_length=torch.tensor([len(r) for r in responses], dtype=torch.long),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        rollout_logprobs=rollout_lp,
        response_start=torch.tensor([max(len(p) - 1, 0) for p in prompts], dtype=torch.long),
    )
    return exp.to(device)
