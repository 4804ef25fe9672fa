"""Tokenizers: one interface over SentencePiece `.model` files and Hugging Face `tokenizer.json` files.

`Tokenizer.load(path)` picks the implementation from the path: a directory or a `.json` file is a Hugging Face
tokenizer (needs the `tokenizers` package, imported only then); anything else is a SentencePiece model. Also holds a
deterministic SentencePiece trainer.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

from mrlhf.errors import MrlhfError

# Fallback special-token names, tried in order, when tokenizer_config.json does not name the token.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<eos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer(ABC):
    """What the rest of mrlhf needs from a tokenizer: ids, text <-> ids, and an identity (hash).

    `encode` never adds bos/eos; callers add `bos_id` (when not None) and `eos_id` themselves.
    """

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Load a tokenizer: a directory or `.json` file -> HFTokenizer, otherwise a SentencePiece `.model`.

        Raises MrlhfError naming the path if it is missing, unreadable or not a tokenizer.
        """
        p = Path(path)
        if p.is_dir() or p.suffix == ".json":
            return HFTokenizer.load(path)
        return SentencePieceTokenizer.load(path)

    @property
    @abstractmethod
    def path(self) -> str:
        """Path the tokenizer was loaded from."""

    @property
    @abstractmethod
    def hash(self) -> str:
        """sha256 hex digest of the tokenizer file(s); pins checkpoints and caches to this tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of tokens, including special tokens."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None for tokenizers without one (Qwen-style): then prepend nothing."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """End-of-sequence id."""

    @property
    @abstractmethod
    def eos_token(self) -> str:
        """Text of the eos token (e.g. `</s>`, `<|im_end|>`); chat templates compare against it."""

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """Padding id; the eos id when the tokenizer defines no pad token."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, without bos/eos or any other added special token."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (any iterable of ints, including a 1-D tensor); special tokens are kept."""


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model."""

    def __init__(self, sp: spm.SentencePieceProcessor, path: str, model_bytes: bytes) -> None:
        self._sp = sp
        self._path = path
        self._hash = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        """Load a `.model` file; raises MrlhfError naming the path if it is missing or not a model."""
        p = Path(path)
        if not p.is_file():
            raise MrlhfError(f"{path}: tokenizer model not found")
        try:
            model_bytes = p.read_bytes()
        except OSError as e:
            raise MrlhfError(f"{path}: cannot read tokenizer model: {e.strerror or e}") from e
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise MrlhfError(f"{path}: not a valid sentencepiece model: {e}") from e
        return cls(sp, str(path), model_bytes)

    @property
    def path(self) -> str:
        """Path the model was loaded from."""
        return self._path

    @property
    def hash(self) -> str:
        """sha256 hex digest of the .model file bytes."""
        return self._hash

    @property
    def vocab_size(self) -> int:
        """Number of pieces, including special and byte-fallback pieces."""
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._sp.eos_id()

    @property
    def eos_token(self) -> str:
        """The eos piece, `</s>` for models trained by `train_sentencepiece`."""
        return self._sp.IdToPiece(self.eos_id)

    @property
    def pad_id(self) -> int:
        """Padding id; the eos id when the model defines no pad piece."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, without bos/eos."""
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (any iterable of ints, including a 1-D tensor)."""
        return self._sp.DecodeIds([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), with specials from `tokenizer_config.json`."""

    def __init__(self, tok: Any, path: str, digest: str, bos_id: int | None, eos_id: int, pad_id: int | None) -> None:
        self._tok = tok  # tokenizers.Tokenizer
        self._path = path
        self._hash = digest
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        """Load `path/tokenizer.json` (directory) or a `tokenizer.json` file and its sibling tokenizer_config.json.

        Special tokens come from the config's `bos_token`/`eos_token`/`pad_token` (a string, a `{"content": ...}`
        dict, or null for none); a token the config does not name is looked up by common names in the vocab.
        """
        p = Path(path)
        json_path = p / "tokenizer.json" if p.is_dir() else p
        if not json_path.is_file():
            where = f"{path}: directory has no tokenizer.json" if p.is_dir() else f"{path}: tokenizer file not found"
            raise MrlhfError(where)
        try:
            from tokenizers import Tokenizer as _RawTokenizer
        except ImportError as e:
            raise MrlhfError(
                f"{path}: loading a tokenizer.json needs the `tokenizers` package (pip install tokenizers)"
            ) from e
        json_bytes = _read(json_path)
        try:
            tok = _RawTokenizer.from_str(json_bytes.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed json or an unknown model
            raise MrlhfError(f"{json_path}: not a valid tokenizer.json: {e}") from e

        digest = hashlib.sha256(json_bytes)
        config: dict = {}
        config_path = json_path.parent / "tokenizer_config.json"
        if config_path.is_file():
            config_bytes = _read(config_path)
            digest.update(config_bytes)
            try:
                config = json.loads(config_bytes)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise MrlhfError(f"{config_path}: not valid json: {e}") from e
            if not isinstance(config, dict):
                raise MrlhfError(f"{config_path}: expected a json object, got {type(config).__name__}")

        def special(key: str, names: tuple[str, ...]) -> int | None:
            if key in config:  # named (or explicitly null) in the config: no guessing
                value = config[key]
                token = value.get("content") if isinstance(value, dict) else value
                if token is None:
                    return None
                if not isinstance(token, str):
                    raise MrlhfError(f'{config_path}: {key} must be a string or {{"content": ...}}, got {value!r}')
                token_id = tok.token_to_id(token)
                if token_id is None:
                    raise MrlhfError(f"{config_path}: {key} {token!r} is not in the vocabulary of {json_path}")
                return token_id
            return next((i for i in map(tok.token_to_id, names) if i is not None), None)

        eos_id = special("eos_token", _EOS_NAMES)
        if eos_id is None:
            raise MrlhfError(
                f"{path}: no eos token: set eos_token in tokenizer_config.json (tried {', '.join(_EOS_NAMES)})"
            )
        return cls(
            tok,
            str(path),
            digest.hexdigest(),
            special("bos_token", _BOS_NAMES),
            eos_id,
            special("pad_token", _PAD_NAMES),
        )

    @property
    def path(self) -> str:
        """Path the tokenizer was loaded from (the directory or the tokenizer.json file, as given)."""
        return self._path

    @property
    def hash(self) -> str:
        """sha256 hex digest over tokenizer.json bytes followed by tokenizer_config.json bytes when present."""
        return self._hash

    @property
    def vocab_size(self) -> int:
        """Number of tokens, including added (special) tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id; None when the tokenizer has none (e.g. Qwen): callers then prepend nothing."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._eos_id

    @property
    def eos_token(self) -> str:
        """Text of the eos token."""
        return self._tok.id_to_token(self._eos_id)

    @property
    def pad_id(self) -> int:
        """Padding id; the eos id when the tokenizer defines no pad token."""
        return self._eos_id if self._pad_id is None else self._pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; no bos/eos or other post-processor tokens (special tokens written in the text
        itself, like `<|im_start|>`, still become their single ids)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (any iterable of ints, including a 1-D tensor); special tokens are kept as text."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise MrlhfError(f"{path}: cannot read tokenizer file: {e.strerror or e}") from e


def train_sentencepiece(
    input_files: list[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: list[str] | None = None,
) -> str:
    """Train a SentencePiece model deterministically and return the path of the written `.model` file. A vocabulary
    size the corpus cannot give is an MrlhfError that says which sizes work."""
    model = io.BytesIO()
    try:
        _train(input_files, model, vocab_size, model_type, user_defined_symbols)
    except RuntimeError as e:
        raise MrlhfError(_vocab_size_hint(input_files, vocab_size, model_type, user_defined_symbols, str(e))) from e
    model_path = f"{model_prefix}.model"
    Path(model_path).write_bytes(model.getvalue())
    return model_path


_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")


def _vocab_size_hint(files: list[str], vocab_size: int, model_type: str, symbols: list[str] | None, err: str) -> str:
    """One line for a failed training: the workable range of --vocab-size when the failure was the size.

    The floor is every byte-fallback piece (256), the 4 special ids, the user symbols and one piece per distinct
    character; the ceiling is how many pieces the corpus allows (known only after training on it)."""
    where = ", ".join(files)
    floor = _TOO_SMALL.search(err)
    floor = int(floor.group(1)) if floor else _vocab_floor(files, model_type, symbols)
    ceiling = _TOO_LARGE.search(err)
    if ceiling:
        supported = f"{floor} to {ceiling.group(1)}" if floor else f"at most {ceiling.group(1)}"
        return f"--vocab-size {vocab_size} is too large for {where}: it supports {supported} (more text allows more)"
    if floor and vocab_size < floor:
        return (
            f"--vocab-size {vocab_size} is too small for {where}: needs at least {floor} (256 byte-fallback "
            f"pieces + 4 special ids + user symbols + one per distinct character)"
        )
    return f"sentencepiece training on {where} failed: {err}"


def _vocab_floor(files: list[str], model_type: str, symbols: list[str] | None) -> int | None:
    """The smallest vocabulary the corpus allows, from sentencepiece itself: with room for exactly the byte and special
    pieces it stops at counting the characters, before any merge is made (cheap)."""
    try:
        _train(files, io.BytesIO(), 256 + 4 + len(symbols or []), model_type, symbols)
    except RuntimeError as e:
        found = _TOO_SMALL.search(str(e))
        return int(found.group(1)) if found else None
    return None


def _train(files: list[str], writer: io.BytesIO, vocab_size: int, model_type: str, symbols: list[str] | None) -> None:
    # Sentences are fed from Python and the model comes back as bytes, so no file path ends up in the model's
    # trainer spec: the same inputs give a byte-identical .model (and tokenizer hash) wherever they live.
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_read_lines(files),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=symbols or [],
        byte_fallback=True,
        character_coverage=1.0,
        # Lossless text <-> ids: no normalization, no whitespace rewriting, no implicit leading space, so
        # encode(prompt) + encode(response) decodes back to prompt + response exactly.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        # Determinism: one thread, every input sentence, no shuffling or subsampling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )


def _read_lines(input_files: list[str]) -> Iterator[str]:
    """Yield the non-empty lines of the input files, one training sentence each."""
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line
