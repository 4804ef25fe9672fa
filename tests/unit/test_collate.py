"""Batch collation (plain, packed, preference and prompt batches), SFT packing, the sample order, and the tiny
SFT assets."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import mrlhf
from mrlhf.data.collate import collate_packed_sft, collate_preference, collate_prompts, collate_sft, pack_sft
from mrlhf.data.datasets import TokenizeOptions, global_batch_indices, load_tokenized
from mrlhf.data.formats import read_dataset
from mrlhf.data.tokenizer import Tokenizer

TINY = Path(mrlhf.__file__).parent / "assets" / "tiny"
BOS, EOS, PAD = 2, 3, 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(str(TINY / "tokenizer.model"))


def grid(*rows: str) -> list[list[bool]]:
    """A boolean matrix written as strings: 'x' = True, '.' = False."""
    return [[c == "x" for c in row] for row in rows]


# ---- tiny assets ----


def test_tiny_assets_are_valid() -> None:
    assert len(read_dataset(str(TINY / "sft_train.jsonl"), "sft").samples) >= 1000
    assert len(read_dataset(str(TINY / "sft_eval.jsonl"), "sft").samples) >= 100


# ---- sampling order ----


def test_global_batch_indices_deterministic() -> None:
    assert global_batch_indices(50, 3, 0, 8) == global_batch_indices(50, 3, 0, 8)
    assert global_batch_indices(50, 3, 0, 8) != global_batch_indices(50, 4, 0, 8)


def test_global_batch_indices_resume_continuity() -> None:
    n, seed = 20, 7
    one_call = global_batch_indices(n, seed, 0, 24)
    steps = [global_batch_indices(n, seed, c, 8) for c in (0, 8, 16)]
    assert one_call == steps[0] + steps[1] + steps[2]
    # resuming at any consumed count, even mid-batch, continues the same stream
    stream = global_batch_indices(n, seed, 0, 100)
    for consumed in (0, 3, 19, 20, 37, 60):
        assert global_batch_indices(n, seed, consumed, 11) == stream[consumed : consumed + 11]


def test_global_batch_indices_epochs_are_permutations_and_differ() -> None:
    n, seed = 13, 0
    stream = global_batch_indices(n, seed, 0, 4 * n)
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 4
    # epoch wrap inside one batch: the tail of epoch 0 followed by the head of epoch 1
    assert global_batch_indices(n, seed, n - 2, 5) == epochs[0][-2:] + epochs[1][:3]
    # batch larger than the dataset spans several epochs
    assert global_batch_indices(n, seed, 5, 2 * n) == stream[5 : 5 + 2 * n]


def test_global_batch_indices_matches_spec() -> None:
    n, seed = 10, 42
    expected = [int(np.random.default_rng([seed, k // n]).permutation(n)[k % n]) for k in range(25, 33)]
    assert global_batch_indices(n, seed, 25, 8) == expected


@pytest.mark.parametrize(("n", "consumed", "gbs"), [(0, 0, 8), (10, -1, 8), (10, 0, 0)])
def test_global_batch_indices_rejects_bad_args(n: int, consumed: int, gbs: int) -> None:
    with pytest.raises(ValueError):
        global_batch_indices(n, 0, consumed, gbs)


# ---- collate_sft ----


def test_collate_shift_and_padding() -> None:
    samples = [([2, 10, 11, 12, 3], [0, 0, 0, 1, 1]), ([2, 20, 3], [0, 1, 1])]
    batch = collate_sft(samples, pad_id=0)
    assert set(batch) == {"tokens", "labels", "loss_mask", "attention_mask", "position_ids"}
    assert batch["tokens"].tolist() == [[2, 10, 11, 12], [2, 20, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, 12, 3], [20, 3, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "attention_mask": torch.bool,
        "position_ids": torch.int64,
    }


def test_collate_pad_to() -> None:
    batch = collate_sft([([2, 5, 3], [0, 1, 1])], pad_id=9, pad_to=6)
    assert all(v.shape == (1, 6) for v in batch.values())
    assert batch["tokens"].tolist() == [[2, 5, 9, 9, 9, 9]]
    assert batch["labels"].tolist() == [[5, 3, 9, 9, 9, 9]]
    assert batch["loss_mask"].sum().item() == 2.0
    with pytest.raises(ValueError):
        collate_sft([([2, 5, 6, 3], [0, 0, 1, 1])], pad_id=0, pad_to=2)


@pytest.mark.parametrize("samples", [[], [([2, 5, 3], [0, 1])], [([2], [0])]])
def test_collate_sft_rejects_bad_samples(samples: list) -> None:
    with pytest.raises(ValueError):
        collate_sft(samples, pad_id=0)


def test_collate_real_samples(tok: Tokenizer) -> None:
    ds = load_tokenized(str(TINY / "sft_eval.jsonl"), "sft", tok, TokenizeOptions(), None)
    samples = [ds[i] for i in global_batch_indices(len(ds), 0, 0, 8)]
    batch = collate_sft(samples, pad_id=tok.pad_id)
    b, s = batch["tokens"].shape
    assert (b, s) == (8, max(len(t) for t, _ in samples) - 1)
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(t) - 1 for t, _ in samples]))
    assert torch.equal(batch["loss_mask"].sum(1), torch.tensor([float(sum(f[1:])) for _, f in samples]))


# ---- pack_sft ----


def sample(first: int, n_tokens: int) -> tuple[list[int], list[int]]:
    """A distinguishable SFT item of ``n_tokens`` tokens (``n_tokens - 1`` shifted): bos, first, first+1, ..., eos."""
    body = list(range(first, first + n_tokens - 2))
    return [BOS, *body, EOS], [0] + [1] * (n_tokens - 1)


def test_pack_sft_first_fit_in_order() -> None:
    a, b, c, d, e = sample(10, 5), sample(20, 4), sample(30, 3), sample(40, 6), sample(50, 2)  # shifted 4 3 2 5 1
    rows = pack_sft([a, b, c, d, e], max_len=6)
    # a opens row 0; b (3) does not fit next to a (4) -> row 1; c (2) fills row 0 exactly; d (5) fits nowhere ->
    # row 2; e (1) skips the full row 0 and lands in row 1, the first with room
    assert rows == [[a, c], [b, e], [d]]
    assert rows[0][0] is a and rows[1][1] is e  # the items themselves, not copies


def test_pack_sft_exact_fit_and_empty() -> None:
    full = sample(10, 7)  # 6 shifted tokens
    assert pack_sft([full], max_len=6) == [[full]]
    assert pack_sft([], max_len=6) == []


@pytest.mark.parametrize("max_len", [8, 13, 64])
def test_pack_sft_rows_fit_and_every_sample_is_placed_once(max_len: int) -> None:
    rng = random.Random(max_len)
    samples = [sample(100 * i, rng.randint(2, max_len + 1)) for i in range(60)]
    rows = pack_sft(samples, max_len)
    assert all(sum(len(t) - 1 for t, _ in row) <= max_len for row in rows)
    placed = [id(item) for row in rows for item in row]
    assert sorted(placed) == sorted(id(s) for s in samples)  # each exactly once
    position = {id(s): i for i, s in enumerate(samples)}
    for row in rows:  # within a row, samples keep their input order
        order = [position[id(item)] for item in row]
        assert order == sorted(order)
    # first fit: when a sample opened a new row, no earlier row had room for it at that moment
    used = [0] * len(rows)
    row_of = {id(item): r for r, row in enumerate(rows) for item in row}
    for s in samples:
        r, n = row_of[id(s)], len(s[0]) - 1
        assert all(used[q] + n > max_len for q in range(r))
        used[r] += n


def test_pack_sft_oversize_raises() -> None:
    with pytest.raises(ValueError, match="max_len=6"):
        pack_sft([sample(10, 3), sample(20, 8)], max_len=6)  # 7 shifted tokens


# ---- collate_packed_sft ----

A = ([2, 10, 11, 3], [0, 0, 1, 1])  # 3 shifted tokens
B = ([2, 20, 21, 22, 3], [0, 0, 0, 1, 1])  # 4
C = ([2, 30, 3], [0, 1, 1])  # 2


def test_collate_packed_sft_tokens_labels_positions() -> None:
    batch = collate_packed_sft([[A, B], [C]], pad_id=PAD)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "real_tokens"}
    assert batch["tokens"].tolist() == [[2, 10, 11, 2, 20, 21, 22], [2, 30, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, 3, 20, 21, 22, 3], [30, 3, 0, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["real_tokens"].tolist() == [[True] * 7, [True, True] + [False] * 5]
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
        "attention_mask": torch.bool,
        "real_tokens": torch.bool,
    }


def test_collate_packed_sft_loss_stays_inside_each_sample() -> None:
    batch = collate_packed_sft([[A, B]], pad_id=PAD)
    last_of_a, first_of_b = 2, 3
    # the last position of A predicts A's own eos (and is trained on), not B's bos that follows it in the row
    assert batch["tokens"][0, first_of_b].item() == BOS
    assert batch["labels"][0, last_of_a].item() == EOS != batch["tokens"][0, first_of_b].item()
    assert batch["loss_mask"][0, last_of_a].item() == 1.0
    # and the first position of B (its bos) predicts B's first token, a prompt token: no loss
    assert batch["labels"][0, first_of_b].item() == 20 and batch["loss_mask"][0, first_of_b].item() == 0.0


def test_collate_packed_sft_attention_mask() -> None:
    mask = collate_packed_sft([[A, B], [C]], pad_id=PAD)["attention_mask"]
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    allowed = ~mask[:, 0]  # True = masked, so invert to "may attend"
    assert allowed[0].tolist() == grid(
        "x......",
        "xx.....",
        "xxx....",
        "...x...",
        "...xx..",
        "...xxx.",
        "...xxxx",
    )  # block-diagonal causal: A in [0, 3), B in [3, 7)
    assert allowed[1].tolist() == grid(
        "x......",
        "xx.....",
        "..x....",
        "...x...",
        "....x..",
        ".....x.",
        "......x",
    )  # C in [0, 2); each padding position attends only to itself
    assert allowed.any(-1).all()  # every query has a key: no all-masked softmax row


def test_pack_then_collate_real_samples(tok: Tokenizer) -> None:
    ds = load_tokenized(str(TINY / "sft_eval.jsonl"), "sft", tok, TokenizeOptions(), None)
    samples = [ds[i] for i in range(40)]
    rows = pack_sft(samples, max_len=128)
    batch = collate_packed_sft(rows, pad_id=tok.pad_id)
    assert batch["tokens"].shape == (len(rows), max(sum(len(t) - 1 for t, _ in row) for row in rows))
    assert batch["real_tokens"].sum().item() == sum(len(t) - 1 for t, _ in samples)
    assert batch["loss_mask"].sum().item() == sum(sum(f[1:]) for _, f in samples)
    for r, row in enumerate(rows):
        start = 0
        for t, _ in row:
            n = len(t) - 1
            assert batch["tokens"][r, start : start + n].tolist() == t[:-1]
            assert batch["labels"][r, start : start + n].tolist() == t[1:]
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            start += n


# ---- collate_preference ----

PAIRS = [
    {"chosen": [2, 10, 11, 3], "chosen_mask": [0, 0, 1, 1], "rejected": [2, 10, 12, 13, 3],
     "rejected_mask": [0, 0, 1, 1, 1], "margin": 1.5},
    {"chosen": [2, 20, 21, 22, 23, 3], "chosen_mask": [0, 0, 0, 1, 1, 1], "rejected": [2, 20, 21, 3],
     "rejected_mask": [0, 0, 0, 1], "margin": None},
]  # fmt: skip


def test_collate_preference() -> None:
    batch = collate_preference(PAIRS, pad_id=PAD)
    assert set(batch) == {"tokens", "labels", "loss_mask", "attention_mask", "position_ids", "margin"}
    # rows [0, b) are the chosen responses, rows [b, 2b) the rejected ones, in pair order; tokens are unshifted
    assert batch["tokens"].tolist() == [
        [2, 10, 11, 3, 0, 0],
        [2, 20, 21, 22, 23, 3],
        [2, 10, 12, 13, 3, 0],
        [2, 20, 21, 3, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [10, 11, 3, 0, 0, 0],
        [20, 21, 22, 23, 3, 0],
        [10, 12, 13, 3, 0, 0],
        [20, 21, 3, 0, 0, 0],
    ]
    assert batch["loss_mask"].tolist() == [
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 0, 0, 0],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [4, 6, 5, 4]
    assert batch["attention_mask"].tolist()[2] == [True] * 5 + [False]
    assert batch["position_ids"].tolist() == [list(range(6))] * 4
    assert batch["margin"].tolist() == [1.5, 0.0]  # None -> 0.0
    assert batch["margin"].dtype == torch.float32 and batch["loss_mask"].dtype == torch.float32


def test_collate_preference_label_shift_and_response_mask() -> None:
    batch = collate_preference(PAIRS, pad_id=PAD)
    tokens, labels, real = batch["tokens"], batch["labels"], batch["attention_mask"]
    nxt = real[:, 1:]  # label i is real where token i+1 is
    assert torch.equal(labels[:, :-1][nxt], tokens[:, 1:][nxt])
    # the loss covers exactly the response tokens and eos of each sequence
    items = [(p["chosen"], p["chosen_mask"]) for p in PAIRS] + [(p["rejected"], p["rejected_mask"]) for p in PAIRS]
    for row, (t, f) in enumerate(items):
        picked = labels[row][batch["loss_mask"][row] == 1].tolist()
        assert picked == [x for x, flag in zip(t, f, strict=True) if flag]
        assert picked[-1] == EOS
        assert tokens[row, len(t) - 1].item() == EOS  # the last real token, scored by the reward head


def test_collate_preference_margin_key_may_be_absent() -> None:
    pair = {k: v for k, v in PAIRS[0].items() if k != "margin"}
    assert collate_preference([pair], pad_id=PAD)["margin"].tolist() == [0.0]


# ---- collate_prompts ----


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([[2, 5, 6, 7], [2, 8], [2, 9, 10]], pad_id=PAD)
    assert set(batch) == {"tokens", "attention_mask", "position_ids"}
    assert batch["tokens"].tolist() == [[2, 5, 6, 7], [0, 0, 2, 8], [0, 2, 9, 10]]
    assert batch["attention_mask"].tolist() == grid("xxxx", "..xx", ".xxx")
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]
    real = batch["attention_mask"]
    for row, n in enumerate((4, 2, 3)):  # positions count real tokens from 0
        assert batch["position_ids"][row][real[row]].tolist() == list(range(n))
    assert batch["tokens"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64


@pytest.mark.parametrize("prompts", [[], [[2, 5], []]])
def test_collate_prompts_rejects_empty(prompts: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        collate_prompts(prompts, pad_id=PAD)
