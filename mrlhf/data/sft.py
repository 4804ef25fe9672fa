"""SFT data: validated JSONL reading, prompt rendering, tokenization, sampling order and collation."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mrlhf.data.tokenizer import Tokenizer
from mrlhf.errors import DataError

ROLES = ("system", "user", "assistant")


def render_prompt(turns: list[dict]) -> str:
    """Render conversation turns plus the opening assistant tag: the single chat template used everywhere."""
    parts = [f"<|{t['role']}|>\n{t['content']}\n" for t in turns]
    return "".join(parts) + "<|assistant|>\n"


def _check_text(value: object, path: str, line: int, field: str) -> str:
    """Return `value` if it is a non-blank string, else raise DataError for `field`."""
    if value is None:
        raise DataError(path, line, field, "is null; expected a non-empty string")
    if not isinstance(value, str):
        raise DataError(path, line, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, line, field, "is empty or whitespace")
    return value


def _parse_messages(obj: dict, path: str, line: int) -> dict[str, str]:
    """Validate a `{"messages": [...]}` record; the last (assistant) message is the response."""
    messages = obj["messages"]
    if messages is None:
        raise DataError(path, line, "messages", "is null; expected a list of {role, content} objects")
    if not isinstance(messages, list):
        raise DataError(path, line, "messages", f"expected a list, got {type(messages).__name__}")
    if not messages:
        raise DataError(path, line, "messages", "is empty")
    turns = []
    for i, msg in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(path, line, field, f"expected an object, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(path, line, f"{field}.{key}", "is missing")
        role = _check_text(msg["role"], path, line, f"{field}.role")
        if role not in ROLES:
            raise DataError(path, line, f"{field}.role", f"unknown role '{role}'; expected one of {', '.join(ROLES)}")
        turns.append({"role": role, "content": _check_text(msg["content"], path, line, f"{field}.content")})
    last = len(turns) - 1
    if turns[last]["role"] != "assistant":
        raise DataError(path, line, f"messages[{last}].role", "last message must have role 'assistant'")
    if last == 0:
        raise DataError(path, line, "messages", "needs at least one turn before the final assistant message")
    return {"prompt": render_prompt(turns[:last]), "response": turns[last]["content"]}


def _parse_record(obj: object, path: str, line: int) -> dict[str, str]:
    """Validate one decoded JSON line in either schema and return `{"prompt", "response"}`."""
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise DataError(path, line, "messages", "use either 'messages' or 'prompt'/'response', not both")
        return _parse_messages(obj, path, line)
    if "prompt" not in obj and "response" not in obj:
        raise DataError(path, line, "prompt", "is missing; expected 'prompt' and 'response', or 'messages'")
    for key in ("prompt", "response"):
        if key not in obj:
            raise DataError(path, line, key, "is missing")
    prompt = _check_text(obj["prompt"], path, line, "prompt")
    response = _check_text(obj["response"], path, line, "response")
    return {"prompt": render_prompt([{"role": "user", "content": prompt}]), "response": response}


def _iter_sft_jsonl(path: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield `(1-based line number, record)` for every non-blank line of an SFT JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(path, None, None, "file not found")
    found = False
    with p.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, None, f"invalid JSON: {e.msg} at column {e.colno}") from e
            found = True
            yield line_no, _parse_record(obj, path, line_no)
    if not found:
        raise DataError(path, None, None, "file is empty (no records)")


def read_sft_jsonl(path: str) -> list[dict]:
    """Read and validate an SFT JSONL file into `{"prompt", "response"}` records with rendered prompts."""
    return [record for _, record in _iter_sft_jsonl(path)]


def tokenize_sft(
    record: dict,
    tokenizer: Tokenizer,
    max_seq_len: int,
    path: str = "<record>",
    line: int | None = None,
) -> tuple[list[int], list[int]]:
    """Return `(tokens, loss_flags)`: bos + prompt + response + eos, with flags 1 on response and eos only."""
    prompt_ids = tokenizer.encode(record["prompt"])
    response_ids = tokenizer.encode(record["response"])
    tokens = [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]
    flags = [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
    # The model sees tokens[:-1] and predicts tokens[1:], so max_seq_len + 1 tokens fill one sequence.
    if len(tokens) > max_seq_len + 1:
        message = f"sample is {len(tokens)} tokens with bos/eos; max_seq_len={max_seq_len} allows {max_seq_len + 1}"
        raise DataError(path, line, None, message)
    return tokens, flags


class SFTDataset:
    """An SFT JSONL file, validated and tokenized eagerly into `(tokens, loss_flags)` samples."""

    def __init__(self, path: str, tokenizer: Tokenizer, max_seq_len: int) -> None:
        self.path = path
        self.samples: list[tuple[list[int], list[int]]] = [
            tokenize_sft(record, tokenizer, max_seq_len, path=path, line=line_no)
            for line_no, record in _iter_sft_jsonl(path)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.samples[index]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch; cached because consecutive steps mostly hit the same epoch."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def global_batch_indices(num_samples: int, seed: int, consumed_samples: int, global_batch_size: int) -> list[int]:
    """Dataset indices of the global batch that starts at sample number `consumed_samples`.

    Sample number k is position k % n of epoch k // n, whose order is a seeded permutation, so the order
    depends only on (n, seed, k): resuming from any consumed count continues the same stream.
    """
    if num_samples <= 0 or global_batch_size <= 0 or consumed_samples < 0:
        raise ValueError(
            f"need num_samples > 0, global_batch_size > 0, consumed_samples >= 0; got {num_samples}, "
            f"{global_batch_size}, {consumed_samples}"
        )
    indices: list[int] = []
    k, end = consumed_samples, consumed_samples + global_batch_size
    while k < end:
        epoch, pos = divmod(k, num_samples)
        take = min(end - k, num_samples - pos)
        indices.extend(_epoch_permutation(num_samples, seed, epoch)[pos : pos + take].tolist())
        k += take
    return indices


def collate_sft(
    samples: list[tuple[list[int], list[int]]], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
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
