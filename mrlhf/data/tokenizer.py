"""SentencePiece tokenizer wrapper and a deterministic trainer for it."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from mrlhf.errors import MrlhfError


class Tokenizer:
    """A loaded SentencePiece model with the ids and identity (hash) the rest of mrlhf needs."""

    def __init__(self, sp: spm.SentencePieceProcessor, path: str, model_bytes: bytes) -> None:
        self._sp = sp
        self._path = path
        self._hash = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str) -> Tokenizer:
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
        """sha256 hex digest of the .model file bytes; pins checkpoints and caches to this tokenizer."""
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


def train_sentencepiece(
    input_files: list[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: list[str] | None = None,
) -> str:
    """Train a SentencePiece model deterministically and return the path of the written `.model` file."""
    # Sentences are fed from Python and the model comes back as bytes, so no file path ends up in the model's
    # trainer spec: the same inputs give a byte-identical .model (and tokenizer hash) wherever they live.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_read_lines(input_files),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            user_defined_symbols=user_defined_symbols or [],
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
    except RuntimeError as e:  # e.g. "Vocabulary size too high": the corpus cannot support vocab_size
        raise MrlhfError(f"sentencepiece training on {', '.join(input_files)} failed: {e}") from e
    model_path = f"{model_prefix}.model"
    Path(model_path).write_bytes(model.getvalue())
    return model_path


def _read_lines(input_files: list[str]) -> Iterator[str]:
    """Yield the non-empty lines of the input files, one training sentence each."""
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line
