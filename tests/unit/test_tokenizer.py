"""Tokenizer wrappers (SentencePiece and Hugging Face tokenizer.json) and deterministic SentencePiece training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

import mrlhf
from mrlhf.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, train_sentencepiece
from mrlhf.errors import MrlhfError

TINY_MODEL = Path(mrlhf.__file__).parent / "assets" / "tiny" / "tokenizer.model"
HF_DIR = Path(__file__).parents[1] / "fixtures" / "hf_tokenizer"


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
    # 256 byte pieces + 4 special ids + 6 distinct characters ("1", " ", "+", "=", "2", ".") = 266
    with pytest.raises(MrlhfError) as err:
        train_sentencepiece([str(corpus)], str(tmp_path / "t"), vocab_size=5000)
    msg = str(err.value)
    assert "corpus.txt" in msg and "--vocab-size 5000 is too large" in msg, msg
    low, high = map(int, re.search(r"supports (\d+) to (\d+)", msg).groups())
    assert low == 266 and low <= high < 5000, msg
    assert "\n" not in msg and "trainer_interface" not in msg  # one line, not sentencepiece's raw text
    for size in (low, high):  # both ends of the stated range really train
        assert Tokenizer.load(train_sentencepiece([str(corpus)], str(tmp_path / f"v{size}"), size)).vocab_size == size


def test_train_vocab_too_small_says_the_floor(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("1 + 1 = 2.\n")
    for size in (2, 100, 265):
        with pytest.raises(MrlhfError, match=rf"--vocab-size {size} is too small for .*: needs at least 266 ") as err:
            train_sentencepiece([str(corpus)], str(tmp_path / "t"), vocab_size=size)
        assert str(corpus) in str(err.value)


def test_sentencepiece_load_type_and_eos_token(tok: Tokenizer) -> None:
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert tok.eos_token == "</s>"


# Hugging Face tokenizer.json (fixture built by tests/fixtures/hf_tokenizer/make.py). Tests that parse one skip
# without the optional `tokenizers` package.


@pytest.fixture(scope="module")
def hf() -> Tokenizer:
    pytest.importorskip("tokenizers")
    return Tokenizer.load(str(HF_DIR))


def _copy_fixture(dst: Path, config: dict | None) -> Path:
    """A copy of the fixture's tokenizer.json with `config` (or none) as its tokenizer_config.json."""
    pytest.importorskip("tokenizers")
    dst.mkdir()
    shutil.copy(HF_DIR / "tokenizer.json", dst / "tokenizer.json")
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_hf_load_dir_and_file_agree(hf: Tokenizer) -> None:
    by_file = Tokenizer.load(str(HF_DIR / "tokenizer.json"))
    assert isinstance(hf, HFTokenizer) and isinstance(by_file, HFTokenizer)
    assert hf.path == str(HF_DIR) and by_file.path == str(HF_DIR / "tokenizer.json")
    assert hf.hash == by_file.hash
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (by_file.vocab_size, 0, 1, 2)


def test_hf_special_ids_from_config(hf: Tokenizer) -> None:
    # Fixture config names bos/pad as strings and eos as a {"content": ...} dict; ids follow SPECIALS order.
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 2)
    assert hf.eos_token == "</s>"
    assert 300 <= hf.vocab_size <= 512
    assert hf.encode("<|im_start|>") == [3] and hf.encode("<|im_end|>") == [4]


@pytest.mark.parametrize(
    "text",
    [
        "What is 23 + 58?",
        "<|im_start|>user\nCompute 7 - 3.<|im_end|>\n",
        "  spaces  and\ttabs ",
        "unseen: héllo ☃ 日本",
    ],
)
def test_hf_round_trip(hf: Tokenizer, text: str) -> None:
    ids = hf.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert hf.decode(ids) == text


def test_hf_adds_no_special_tokens(hf: Tokenizer) -> None:
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    assert raw.encode("1 + 2 = 3.").ids[0] == 0  # the fixture's post-processor adds <s> ... </s> by default
    ids = hf.encode("1 + 2 = 3.")
    assert ids == raw.encode("1 + 2 = 3.").ids[1:-1]
    assert hf.bos_id not in ids and hf.eos_id not in ids
    assert hf.decode([hf.bos_id, *ids, hf.eos_id]) == "<s>1 + 2 = 3.</s>"  # decode skips nothing


def test_hf_concatenated_encodings_decode_to_concatenated_text(hf: Tokenizer) -> None:
    prompt, response = "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "1 + 2 = 3."
    assert hf.decode(hf.encode(prompt) + hf.encode(response)) == prompt + response


def test_hf_decode_accepts_tensor(hf: Tokenizer) -> None:
    import torch

    assert hf.decode(torch.tensor(hf.encode("12 + 30 = 42."))) == "12 + 30 = 42."


def test_hf_hash_covers_json_and_config(hf: Tokenizer, tmp_path: Path) -> None:
    json_bytes = (HF_DIR / "tokenizer.json").read_bytes()
    config_bytes = (HF_DIR / "tokenizer_config.json").read_bytes()
    assert hf.hash == hashlib.sha256(json_bytes + config_bytes).hexdigest()
    no_config = Tokenizer.load(str(_copy_fixture(tmp_path / "a", None)))
    assert no_config.hash == hashlib.sha256(json_bytes).hexdigest()
    changed = Tokenizer.load(str(_copy_fixture(tmp_path / "b", {"eos_token": "</s>", "pad_token": "<|im_end|>"})))
    assert changed.pad_id == 4
    assert len({hf.hash, no_config.hash, changed.hash}) == 3


def test_hf_specials_by_common_names_without_config(tmp_path: Path) -> None:
    tok = Tokenizer.load(str(_copy_fixture(tmp_path / "t", None)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_hf_qwen_style_config(tmp_path: Path) -> None:
    # Qwen: no bos (explicit null), eos <|im_end|>, no pad named anywhere -> pad falls back to eos.
    config = {"bos_token": None, "eos_token": {"content": "<|im_end|>"}, "pad_token": None}
    tok = Tokenizer.load(str(_copy_fixture(tmp_path / "q", config)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_token) == (None, 4, 4, "<|im_end|>")


def test_hf_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(MrlhfError, match="nope/tokenizer.json"):
        Tokenizer.load(str(tmp_path / "nope" / "tokenizer.json"))


def test_hf_dir_without_tokenizer_json_names_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MrlhfError, match="empty: directory has no tokenizer.json"):
        Tokenizer.load(str(tmp_path / "empty"))


def test_hf_corrupt_json_names_path(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(MrlhfError, match="bad/tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(str(tmp_path / "bad"))


def test_hf_corrupt_config_names_path(tmp_path: Path) -> None:
    d = _copy_fixture(tmp_path / "c", None)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(MrlhfError, match="c/tokenizer_config.json: not valid json"):
        Tokenizer.load(str(d))


def test_hf_config_token_not_in_vocab(tmp_path: Path) -> None:
    d = _copy_fixture(tmp_path / "v", {"eos_token": "<|eot_id|>"})
    with pytest.raises(MrlhfError, match=re.escape("eos_token '<|eot_id|>' is not in the vocabulary")):
        Tokenizer.load(str(d))
