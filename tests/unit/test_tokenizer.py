"""Tokenizer wrapper and deterministic SentencePiece training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import mrlhf
from mrlhf.data.tokenizer import Tokenizer, train_sentencepiece
from mrlhf.errors import MrlhfError

TINY_MODEL = Path(mrlhf.__file__).parent / "assets" / "tiny" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(str(TINY_MODEL))


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 320 <= tok.vocab_size <= 512
    assert tok.path == str(TINY_MODEL)


@pytest.mark.parametrize(
    "text",
    ["What is 23 + 58?", "<|user|>\nCompute 7 - 3.\n<|assistant|>\n", "  spaces  and\ttabs ", "unseen: héllo ☃ 日本"],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text


def test_concatenated_encodings_decode_to_concatenated_text(tok: Tokenizer) -> None:
    prompt, response = "<|user|>\nWhat is 1 + 2?\n<|assistant|>\n", "1 + 2 = 3."
    assert tok.decode(tok.encode(prompt) + tok.encode(response)) == prompt + response


def test_role_tags_are_single_tokens(tok: Tokenizer) -> None:
    for tag in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(tok.encode(tag)) == 1


def test_decode_accepts_tensor(tok: Tokenizer) -> None:
    import torch

    ids = tok.encode("12 + 30 = 42.")
    assert tok.decode(torch.tensor(ids)) == "12 + 30 = 42."


def test_hash_is_sha256_of_file_and_stable(tok: Tokenizer) -> None:
    assert tok.hash == hashlib.sha256(TINY_MODEL.read_bytes()).hexdigest()
    assert Tokenizer.load(str(TINY_MODEL)).hash == tok.hash


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.model"
    with pytest.raises(MrlhfError, match="nope.model"):
        Tokenizer.load(str(path))


def test_invalid_model_names_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.model"
    path.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(MrlhfError, match="garbage.model"):
        Tokenizer.load(str(path))


def test_train_is_deterministic_and_path_independent(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"What is {a} + {b}? {a} + {b} = {a + b}.\n" for a in range(30) for b in range(10)))
    first = train_sentencepiece([str(corpus)], str(tmp_path / "a"), vocab_size=288)
    (tmp_path / "sub").mkdir()
    second = train_sentencepiece([str(corpus)], str(tmp_path / "sub" / "b"), vocab_size=288)
    assert first == str(tmp_path / "a.model")
    assert Path(first).read_bytes() == Path(second).read_bytes()
    tok = Tokenizer.load(first)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (288, 0, 2, 3)
    assert tok.decode(tok.encode("What is 3 + 4?")) == "What is 3 + 4?"


def test_train_vocab_too_large_is_user_error(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("1 + 1 = 2.\n")
    with pytest.raises(MrlhfError, match="corpus.txt"):
        train_sentencepiece([str(corpus)], str(tmp_path / "t"), vocab_size=5000)
