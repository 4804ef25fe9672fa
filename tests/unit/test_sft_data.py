"""SFT JSONL validation, tokenization masks, sampling order and collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mrlhf
from mrlhf.data.sft import SFTDataset, collate_sft, global_batch_indices, read_sft_jsonl, render_prompt, tokenize_sft
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.errors import DataError, MrlhfError

TINY = Path(mrlhf.__file__).parent / "assets" / "tiny"
GOOD = json.dumps({"prompt": "What is 1 + 2?", "response": "1 + 2 = 3."})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(str(TINY / "tokenizer.model"))


def write(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# ---- reading ----


def test_render_prompt_template() -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_prompt(turns) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_read_both_schemas_and_skip_blank_lines(tmp_path: Path) -> None:
    messages = {
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4."},
            {"role": "user", "content": "And 4 - 1?"},
            {"role": "assistant", "content": "4 - 1 = 3."},
        ]
    }
    path = write(tmp_path, GOOD, "", "   ", json.dumps(messages))
    records = read_sft_jsonl(path)
    assert records == [
        {"prompt": "<|user|>\nWhat is 1 + 2?\n<|assistant|>\n", "response": "1 + 2 = 3."},
        {
            "prompt": "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n2 + 2 = 4.\n<|user|>\nAnd 4 - 1?\n<|assistant|>\n",
            "response": "4 - 1 = 3.",
        },
    ]


def test_tiny_assets_are_valid() -> None:
    assert len(read_sft_jsonl(str(TINY / "sft_train.jsonl"))) >= 1000
    assert len(read_sft_jsonl(str(TINY / "sft_eval.jsonl"))) >= 100


def msgs(*pairs: tuple[object, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


@pytest.mark.parametrize(
    ("bad_line", "field", "words"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "JSON object"),
        ('"just a string"', None, "JSON object"),
        (json.dumps({"response": "x"}), "prompt", "missing"),
        (json.dumps({"prompt": "x"}), "response", "missing"),
        (json.dumps({"id": 7}), "prompt", "missing"),
        (json.dumps({"prompt": 5, "response": "x"}), "prompt", "expected a string"),
        (json.dumps({"prompt": "x", "response": ["y"]}), "response", "expected a string"),
        (json.dumps({"prompt": None, "response": "x"}), "prompt", "null"),
        (json.dumps({"prompt": "x", "response": None}), "response", "null"),
        (json.dumps({"prompt": "", "response": "x"}), "prompt", "empty"),
        (json.dumps({"prompt": "x", "response": " \n\t"}), "response", "empty"),
        (json.dumps({"messages": []}), "messages", "empty"),
        (json.dumps({"messages": None}), "messages", "null"),
        (json.dumps({"messages": "hi"}), "messages", "expected a list"),
        (json.dumps({"messages": ["hi"]}), "messages[0]", "expected an object"),
        (json.dumps({"messages": [{"role": "user"}]}), "messages[0].content", "missing"),
        (json.dumps({"messages": [{"content": "x"}]}), "messages[0].role", "missing"),
        (msgs(("user", "x"), ("bot", "y")), "messages[1].role", "unknown role 'bot'"),
        (msgs(("user", "x"), ("assistant", None)), "messages[1].content", "null"),
        (msgs(("user", ""), ("assistant", "y")), "messages[0].content", "empty"),
        (msgs(("user", 3), ("assistant", "y")), "messages[0].content", "expected a string"),
        (msgs(("assistant", "x"), ("user", "y")), "messages[1].role", "last message"),
        (json.dumps({"messages": [{"role": "assistant", "content": "y"}]}), "messages", "at least one turn"),
        (json.dumps({"messages": [], "prompt": "x", "response": "y"}), "messages", "not both"),
    ],
)
def test_validation_names_file_line_and_field(tmp_path: Path, bad_line: str, field: str | None, words: str) -> None:
    path = write(tmp_path, GOOD, "", bad_line, GOOD)  # the bad record is on line 3
    with pytest.raises(DataError) as info:
        read_sft_jsonl(path)
    err = info.value
    msg = str(err)
    assert isinstance(err, MrlhfError)
    assert (err.path, err.line, err.field) == (path, 3, field)
    assert msg.startswith(f"{path}:3: ")
    if field is not None:
        assert f"field '{field}'" in msg
    assert words in msg
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="absent.jsonl: file not found"):
        read_sft_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        read_sft_jsonl(str(path))


def test_data_error_format() -> None:
    assert str(DataError("a.jsonl", 4, "prompt", "is empty")) == "a.jsonl:4: field 'prompt': is empty"
    assert str(DataError("a.jsonl", 4, None, "bad")) == "a.jsonl:4: bad"
    assert str(DataError("a.jsonl", None, None, "bad")) == "a.jsonl: bad"


# ---- tokenization ----


def test_tokenize_sft_masks(tok: Tokenizer) -> None:
    record = {"prompt": render_prompt([{"role": "user", "content": "What is 1 + 2?"}]), "response": "1 + 2 = 3."}
    tokens, flags = tokenize_sft(record, tok, max_seq_len=64)
    n_prompt, n_response = len(tok.encode(record["prompt"])), len(tok.encode(record["response"]))
    assert len(tokens) == len(flags) == 1 + n_prompt + n_response + 1
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert flags == [0] * (1 + n_prompt) + [1] * (n_response + 1)
    assert tok.decode(tokens[1:-1]) == record["prompt"] + record["response"]
    assert tok.decode([t for t, f in zip(tokens[:-1], flags[:-1], strict=True) if f]) == record["response"]


def test_tokenize_sft_too_long(tok: Tokenizer) -> None:
    record = {"prompt": "<|user|>\nhi\n<|assistant|>\n", "response": "1 + 2 = 3."}
    tokens, _ = tokenize_sft(record, tok, max_seq_len=64)
    tokenize_sft(record, tok, max_seq_len=len(tokens) - 1)  # exactly fits: inputs are tokens[:-1]
    with pytest.raises(DataError) as info:
        tokenize_sft(record, tok, max_seq_len=len(tokens) - 2, path="d.jsonl", line=9)
    assert str(info.value).startswith("d.jsonl:9: ")
    assert "max_seq_len" in str(info.value)


def test_dataset_reports_line_of_too_long_sample(tmp_path: Path, tok: Tokenizer) -> None:
    long = json.dumps({"prompt": "What is 1 + 2? " * 20, "response": "3."})
    path = write(tmp_path, GOOD, "", long)
    with pytest.raises(DataError, match=r"data.jsonl:3: "):
        SFTDataset(path, tok, max_seq_len=32)


def test_dataset(tmp_path: Path, tok: Tokenizer) -> None:
    path = write(tmp_path, GOOD, msgs(("user", "What is 5 - 2?"), ("assistant", "5 - 2 = 3.")))
    ds = SFTDataset(path, tok, max_seq_len=64)
    assert len(ds) == 2
    assert ds[0] == tokenize_sft(read_sft_jsonl(path)[0], tok, 64)
    assert ds[1] is ds.samples[1]


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
    import numpy as np

    n, seed = 10, 42
    expected = [int(np.random.default_rng([seed, k // n]).permutation(n)[k % n]) for k in range(25, 33)]
    assert global_batch_indices(n, seed, 25, 8) == expected


def test_global_batch_indices_rejects_bad_args() -> None:
    with pytest.raises(ValueError):
        global_batch_indices(0, 0, 0, 8)
    with pytest.raises(ValueError):
        global_batch_indices(10, 0, -1, 8)


# ---- collation ----


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


def test_collate_real_samples(tmp_path: Path, tok: Tokenizer) -> None:
    ds = SFTDataset(str(TINY / "sft_eval.jsonl"), tok, max_seq_len=64)
    samples = [ds[i] for i in global_batch_indices(len(ds), 0, 0, 8)]
    batch = collate_sft(samples, pad_id=tok.pad_id)
    b, s = batch["tokens"].shape
    assert (b, s) == (8, max(len(t) for t, _ in samples) - 1)
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(t) - 1 for t, _ in samples]))
    assert torch.equal(batch["loss_mask"].sum(1), torch.tensor([float(sum(f)) for _, f in samples]))
