"""Batches: padding, packing, loss masks. The only module that decides the padding side.

Training batches are right-padded (real tokens first, so positions are 0..n-1). Prompt batches for generation are
left-padded (every prompt ends at the same column, so decoding appends in lockstep); their positions count real
tokens only. Every batch carries ``tokens``, ``position_ids`` and ``attention_mask`` ([b, s], True = real token) --
or, for packed SFT, a block-diagonal ``attention_mask`` [b, 1, s, s] (True = masked, megatron's convention).
"""

from __future__ import annotations

import torch

SFTItem = tuple[list[int], list[int]]  # (tokens incl. bos/eos, loss flags of the same length)


def collate_sft(samples: list[SFTItem], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Shift and right-pad samples into next-token batches of shape [b, S], S = pad_to or max(len) - 1."""
    if not samples:
        raise ValueError("collate_sft needs at least one sample")
    for tokens, flags in samples:
        if len(tokens) != len(flags) or len(tokens) < 2:
            raise ValueError(f"bad sample: {len(tokens)} tokens, {len(flags)} flags (need equal and >= 2)")
    seq_len = max(len(t) for t, _ in samples) - 1
    if pad_to is not None:
        if pad_to < seq_len:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest shifted sample ({seq_len})")
        seq_len = pad_to
    b = len(samples)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((b, seq_len), dtype=torch.float32)
    attention_mask = torch.zeros((b, seq_len), dtype=torch.bool)
    for i, (t, f) in enumerate(samples):
        n = len(t) - 1
        tokens[i, :n] = torch.tensor(t[:-1], dtype=torch.int64)
        labels[i, :n] = torch.tensor(t[1:], dtype=torch.int64)
        loss_mask[i, :n] = torch.tensor(f[1:], dtype=torch.float32)
        attention_mask[i, :n] = True
    position_ids = torch.arange(seq_len, dtype=torch.int64).unsqueeze(0).repeat(b, 1)  # [S] -> [b, S]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def pack_sft(samples: list[SFTItem], max_len: int) -> list[list[SFTItem]]:
    """Greedy first-fit packing (in order) of samples into rows of at most ``max_len`` shifted tokens."""
    rows: list[list[SFTItem]] = []
    used: list[int] = []
    for item in samples:
        n = len(item[0]) - 1
        if n > max_len:
            raise ValueError(f"sample of {n} shifted tokens does not fit max_len={max_len}")
        for r, u in enumerate(used):
            if u + n <= max_len:
                rows[r].append(item)
                used[r] += n
                break
        else:
            rows.append([item])
            used.append(n)
    return rows


def collate_packed_sft(rows: list[list[SFTItem]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows -> [b, S] batch; attention stays within each sample (block-diagonal causal mask), positions
    restart at 0 for each sample, and the loss never crosses a sample boundary."""
    seq_len = max(sum(len(t) - 1 for t, _ in row) for row in rows)
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((b, seq_len), dtype=torch.float32)
    position_ids = torch.zeros((b, seq_len), dtype=torch.int64)
    segment = torch.full((b, seq_len), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        start = 0
        for k, (t, f) in enumerate(row):
            n = len(t) - 1
            sl = slice(start, start + n)
            tokens[i, sl] = torch.tensor(t[:-1])
            labels[i, sl] = torch.tensor(t[1:])
            loss_mask[i, sl] = torch.tensor(f[1:], dtype=torch.float32)
            position_ids[i, sl] = torch.arange(n)
            segment[i, sl] = k
            start += n
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = causal[None] & same
    allowed |= torch.eye(seq_len, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "attention_mask": (~allowed)[:, None],  # [b, 1, S, S], True = masked
        "real_tokens": segment >= 0,
    }


def collate_preference(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs -> one right-padded batch of 2b whole sequences: chosen in rows [0, b), rejected in rows [b, 2b), so a
    pair always sits in one microbatch.

    ``tokens`` are unshifted (the reward head scores the last real token, eos included); ``labels[:, i]`` is token
    i+1 and ``loss_mask[:, i]`` marks labels that are response tokens (DPO log-probs); ``margin`` is per pair.
    """
    items = [(s["chosen"], s["chosen_mask"]) for s in samples] + [(s["rejected"], s["rejected_mask"]) for s in samples]
    width = max(len(t) for t, _ in items)
    n = len(items)
    tokens = torch.full((n, width), pad_id, dtype=torch.int64)
    labels = torch.full((n, width), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    attention_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (t, f) in enumerate(items):
        tokens[i, : len(t)] = torch.tensor(t)
        labels[i, : len(t) - 1] = torch.tensor(t[1:])
        loss_mask[i, : len(t) - 1] = torch.tensor(f[1:], dtype=torch.float32)
        attention_mask[i, : len(t)] = True
    margins = [s.get("margin") for s in samples]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(width).unsqueeze(0).repeat(n, 1),
        "margin": torch.tensor([0.0 if m is None else float(m) for m in margins], dtype=torch.float32),
    }


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation: tokens [b, P], attention_mask [b, P], positions over real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("collate_prompts needs non-empty prompts")
    width = max(len(p) for p in prompts)
    b = len(prompts)
    tokens = torch.full((b, width), pad_id, dtype=torch.int64)
    mask = torch.zeros((b, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p, dtype=torch.int64)
        mask[i, width - len(p) :] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"tokens": tokens, "attention_mask": mask, "position_ids": positions}
