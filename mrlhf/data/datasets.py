"""Tokenized datasets (SFT, preference, prompt-only), their on-disk cache, blending, stage and eval splits, and the
sample order.

A source file is read and validated by ``formats.read_dataset``, rendered with the run's chat template, tokenized,
length-checked under ``data.length_policy`` and stored as flat memory-mapped numpy arrays in
``<cache_dir>/<key>/``, where the key hashes the file bytes, tokenizer, template, lengths and policy: a rerun maps
the arrays instead of tokenizing again, and any change to those inputs misses the cache.

The order in which training visits samples is a pure function of (seed, consumed samples):
:func:`global_batch_indices`. Resuming at any consumed count continues the same stream.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrlhf.data.records import PreferenceSample, PromptSample, SFTSample
from mrlhf.errors import ConfigError, DataError

CACHE_VERSION = 2  # 2: prompt datasets store each row's other fields ('columns')
STAGES = {"sft": 0, "rm": 1, "dpo": 1, "ppo": 2}


# ----------------------------------------------------------------------------------------------------------------------
# Sample order


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def global_batch_indices(num_samples: int, seed: int, consumed_samples: int, global_batch_size: int) -> list[int]:
    """Dataset indices of the global batch that starts at sample number ``consumed_samples``.

    Sample number k is position k % n of epoch k // n, whose order is a seeded permutation.
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


# ----------------------------------------------------------------------------------------------------------------------
# Tokenized datasets (flat arrays + offsets)


class Ragged:
    """Variable-length int sequences stored flat: values[offsets[i]:offsets[i+1]]."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()

    @classmethod
    def build(cls, seqs: Sequence[Sequence[int]], dtype=np.int32) -> Ragged:
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in seqs])
        values = np.fromiter((x for s in seqs for x in s), dtype=dtype, count=int(offsets[-1]))
        return cls(values, offsets)


class TokenizedDataset:
    """Common base: named ragged fields plus per-sample arrays, saved/loaded as .npy files."""

    kind = ""
    ragged_fields: tuple[str, ...] = ()
    dense_fields: tuple[str, ...] = ("line",)

    def __init__(self, ragged: dict[str, Ragged], dense: dict[str, np.ndarray], source: str) -> None:
        self.ragged, self.dense, self.source = ragged, dense, source

    def __len__(self) -> int:
        return len(self.dense["line"])

    def line(self, i: int) -> int:
        return int(self.dense["line"][i])

    def save(self, directory: str) -> None:
        for name, r in self.ragged.items():
            np.save(os.path.join(directory, f"{name}.values.npy"), r.values)
            np.save(os.path.join(directory, f"{name}.offsets.npy"), r.offsets)
        for name, a in self.dense.items():
            np.save(os.path.join(directory, f"{name}.npy"), a)

    @classmethod
    def load(cls, directory: str, source: str) -> TokenizedDataset:
        def load(name: str) -> np.ndarray:
            return np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")

        ragged = {n: Ragged(load(f"{n}.values"), load(f"{n}.offsets")) for n in cls.ragged_fields}
        dense = {n: load(n) for n in cls.dense_fields}
        return cls(ragged, dense, source)


class SFTDataset(TokenizedDataset):
    """Items: (tokens incl. bos/eos, loss flags: 1 on response tokens and eos)."""

    kind = "sft"
    ragged_fields = ("tokens", "flags")

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.ragged["tokens"][i], self.ragged["flags"][i]


class PreferenceDataset(TokenizedDataset):
    """Items: dict(chosen, chosen_mask, rejected, rejected_mask, margin or None)."""

    kind = "preference"
    ragged_fields = ("chosen", "chosen_mask", "rejected", "rejected_mask")
    dense_fields = ("line", "margin")

    def __getitem__(self, i: int) -> dict:
        margin = float(self.dense["margin"][i])
        item = {name: self.ragged[name][i] for name in self.ragged_fields}
        item["margin"] = None if np.isnan(margin) else margin
        return item


class PromptDataset(TokenizedDataset):
    """Items: prompt tokens (bos + rendered prompt incl. the assistant opener).

    ``columns(i)`` gives the row's other fields (``PromptSample.columns``), stored as its UTF-8 JSON in the ragged
    uint8 field "columns", for reward functions that check a response against e.g. a ground-truth answer.
    """

    kind = "prompt"
    ragged_fields = ("prompt", "columns")

    def __getitem__(self, i: int) -> list[int]:
        return self.ragged["prompt"][i]

    def columns(self, i: int) -> dict[str, Any]:
        r = self.ragged["columns"]
        return json.loads(r.values[r.offsets[i] : r.offsets[i + 1]].tobytes())


DATASET_CLASSES = {c.kind: c for c in (SFTDataset, PreferenceDataset, PromptDataset)}


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization with the length policy


@dataclass
class TokenizeOptions:
    """Everything that shapes token ids; hashed into the cache key."""

    template: str = "plain"
    max_seq_len: int = 256
    max_prompt_len: int = 128
    length_policy: str = "error"
    schema: str | None = None
    reader_options: dict = field(default_factory=dict)


class _Encoder:
    def __init__(self, tokenizer, options: TokenizeOptions) -> None:
        from mrlhf.data.templates import get_template

        self.tok = tokenizer
        self.opt = options
        self.template = get_template(options.template)
        self.suffix = self.template.response_suffix(tokenizer)
        self.stats = {"truncated_prompt": 0, "truncated_response": 0, "dropped": 0}

    def prompt(self, sample, path: str) -> list[int] | None:
        bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
        ids = bos + self.tok.encode(self.template.render_prompt(list(sample.prompt)))
        limit = self.opt.max_prompt_len
        if len(ids) <= limit:
            return ids
        line = sample.source.line
        if self.opt.length_policy == "error":
            raise DataError(
                path, line, "prompt", f"is {len(ids)} tokens, over data.max_prompt_len={limit} (set "
                "data.length_policy=truncate or drop to continue)"
            )  # fmt: skip
        if self.opt.length_policy == "drop":
            self.stats["dropped"] += 1
            return None
        self.stats["truncated_prompt"] += 1
        return bos + ids[len(ids) - (limit - len(bos)) :]  # keep the end: it holds the question and the opener

    def response(self, prompt_ids: list[int], text: str, path: str, line: int | None, name: str):
        resp = self.tok.encode(text + self.suffix) + [self.tok.eos_id]
        tokens = prompt_ids + resp
        flags = [0] * len(prompt_ids) + [1] * len(resp)
        limit = self.opt.max_seq_len
        if len(tokens) <= limit:
            return tokens, flags
        if self.opt.length_policy == "error":
            raise DataError(
                path, line, name, f"prompt+{name} is {len(tokens)} tokens, over data.max_seq_len={limit} (set "
                "data.length_policy=truncate or drop to continue)"
            )  # fmt: skip
        if self.opt.length_policy == "drop" or len(prompt_ids) >= limit:
            self.stats["dropped"] += 1
            return None
        self.stats["truncated_response"] += 1
        return tokens[:limit], flags[:limit]  # a cut response carries no eos: the model must not learn to stop there


def tokenize_samples(kind: str, samples: list, tokenizer, options: TokenizeOptions, path: str) -> TokenizedDataset:
    enc = _Encoder(tokenizer, options)
    lines: list[int] = []
    if kind == "sft":
        toks, flags = [], []
        for s in samples:
            assert isinstance(s, SFTSample)
            p = enc.prompt(s, path)
            r = None if p is None else enc.response(p, s.response, path, s.source.line, "response")
            if r is not None:
                toks.append(r[0])
                flags.append(r[1])
                lines.append(s.source.line or 0)
        ds: TokenizedDataset = SFTDataset(
            {"tokens": Ragged.build(toks), "flags": Ragged.build(flags, np.uint8)}, {}, path
        )
    elif kind == "preference":
        cols: dict[str, list] = {n: [] for n in PreferenceDataset.ragged_fields}
        margins = []
        for s in samples:
            assert isinstance(s, PreferenceSample)
            p = enc.prompt(s, path)
            c = None if p is None else enc.response(p, s.chosen, path, s.source.line, "chosen")
            r = None if c is None else enc.response(p, s.rejected, path, s.source.line, "rejected")
            if r is None:
                continue
            cols["chosen"].append(c[0])
            cols["chosen_mask"].append(c[1])
            cols["rejected"].append(r[0])
            cols["rejected_mask"].append(r[1])
            margins.append(np.nan if s.margin is None else s.margin)
            lines.append(s.source.line or 0)
        ragged = {n: Ragged.build(v, np.uint8 if n.endswith("mask") else np.int32) for n, v in cols.items()}
        ds = PreferenceDataset(ragged, {"margin": np.asarray(margins, dtype=np.float32)}, path)
    elif kind == "prompt":
        prompts, columns = [], []
        for s in samples:
            assert isinstance(s, PromptSample)
            p = enc.prompt(s, path)
            if p is not None:
                prompts.append(p)
                # ASCII JSON is valid UTF-8 even for a lone surrogate; default=str turns a parquet date or bytes into text
                columns.append(json.dumps(s.columns, sort_keys=True, default=str).encode())
                lines.append(s.source.line or 0)
        ds = PromptDataset({"prompt": Ragged.build(prompts), "columns": Ragged.build(columns, np.uint8)}, {}, path)
    else:
        raise ValueError(f"unknown dataset kind {kind!r}")
    ds.dense["line"] = np.asarray(lines, dtype=np.int64)
    ds.stats = enc.stats  # type: ignore[attr-defined]
    return ds


# ----------------------------------------------------------------------------------------------------------------------
# Cache


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(path: str, kind: str, tokenizer, options: TokenizeOptions) -> str:
    parts = {
        "version": CACHE_VERSION,
        "file": _file_sha256(path),
        "kind": kind,
        "tokenizer": tokenizer.hash,
        "options": options.__dict__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_tokenized(
    path: str, kind: str, tokenizer, options: TokenizeOptions, cache_dir: str | None
) -> TokenizedDataset:
    """Read + validate + tokenize ``path``, or map it from the cache when nothing that shapes the ids changed."""
    from mrlhf.data.formats import read_dataset

    cls = DATASET_CLASSES[kind]
    if not os.path.isfile(path):
        raise DataError(path, None, None, "file not found")
    entry = None
    if cache_dir:
        entry = os.path.join(os.path.expanduser(cache_dir), cache_key(path, kind, tokenizer, options))
        if os.path.isfile(os.path.join(entry, "meta.json")):
            ds = cls.load(entry, path)
            with open(os.path.join(entry, "meta.json")) as f:
                ds.stats = json.load(f)["stats"]  # type: ignore[attr-defined]
            ds.cache_hit = True  # type: ignore[attr-defined]
            return ds
    result = read_dataset(path, kind, options.schema, **options.reader_options)
    ds = tokenize_samples(kind, result.samples, tokenizer, options, path)
    ds.stats.update({k: v for k, v in result.stats.items() if k != "records"})  # type: ignore[attr-defined]
    ds.cache_hit = False  # type: ignore[attr-defined]
    if entry:
        tmp = f"{entry}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ds.save(tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"source": os.path.abspath(path), "schema": result.schema, "stats": ds.stats}, f)  # type: ignore[attr-defined]
        try:
            os.rename(tmp, entry)
        except OSError:  # another rank won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return ds


# ----------------------------------------------------------------------------------------------------------------------
# Views: subsets (splits) and blends


class Subset:
    """The samples of ``base`` at ``indices`` (a stage split or a train/eval split)."""

    def __init__(self, base, indices: np.ndarray) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def columns(self, i: int) -> dict[str, Any]:
        """``columns`` of the base sample behind ``self[i]``."""
        return self.base.columns(int(self.indices[i]))


def split_indices(n: int, weights: Sequence[float], part: int, seed: int) -> np.ndarray:
    """Indices of part ``part`` when ``range(n)`` is shuffled by ``seed`` and cut in proportion to ``weights``.

    Parts are disjoint and cover everything; the same (n, weights, seed) always gives the same parts.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0 or not 0 <= part < len(w):
        raise ConfigError(f"bad split weights {list(weights)} / part {part}")
    bounds = np.round(np.cumsum(np.concatenate([[0.0], w])) / w.sum() * n).astype(np.int64)
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return np.sort(perm[bounds[part] : bounds[part + 1]])


class BlendedDataset:
    """Several datasets mixed by ratio: position k of the blend is taken from the dataset whose share is most behind.

    Dataset d appears at the positions where ``(j + 0.5) / ratio_d`` sorts, so every prefix of the blend holds each
    source within one sample of its ratio; within a source, samples follow a seeded permutation.
    """

    def __init__(self, datasets: list, ratios: list[float], seed: int, size: int | None = None) -> None:
        if len(datasets) != len(ratios) or not datasets:
            raise ConfigError("blending needs one ratio per dataset")
        r = np.asarray(ratios, dtype=np.float64)
        if (r <= 0).any():
            raise ConfigError(f"blend ratios must be positive, got {ratios}")
        r = r / r.sum()
        self.datasets, self.ratios = datasets, r
        self.size = size or sum(len(d) for d in datasets)
        keys, which, nth = [], [], []
        for d, ratio in enumerate(r):
            count = int(np.ceil(self.size * ratio)) + 1
            j = np.arange(count)
            keys.append((j + 0.5) / ratio)
            which.append(np.full(count, d))
            nth.append(j)
        order = np.argsort(np.concatenate(keys), kind="stable")[: self.size]
        self.source = np.concatenate(which)[order]
        nth_all = np.concatenate(nth)[order]
        self.sample = np.empty(self.size, dtype=np.int64)
        for d, ds in enumerate(datasets):
            sel = self.source == d
            perm = np.random.default_rng([seed, 104729, d]).permutation(len(ds))
            self.sample[sel] = perm[nth_all[sel] % len(ds)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return self.datasets[int(self.source[i])][int(self.sample[i])]

    def columns(self, i: int) -> dict[str, Any]:
        """``columns`` of the source sample behind ``self[i]``."""
        return self.datasets[int(self.source[i])].columns(int(self.sample[i]))


def parse_source(spec: str) -> tuple[str, float, str]:
    """``name:ratio:path`` or a bare path (ratio 1)."""
    parts = spec.split(":", 2)
    if len(parts) == 3:
        name, ratio, path = parts
        try:
            return name, float(ratio), path
        except ValueError:
            raise ConfigError(f"data source '{spec}': ratio '{ratio}' is not a number (use name:ratio:path)") from None
    return os.path.splitext(os.path.basename(spec))[0], 1.0, spec


# ----------------------------------------------------------------------------------------------------------------------
# From a run config


@dataclass
class DataBundle:
    """What a trainer needs: train and eval views plus the counted outcomes of the length policy and readers."""

    train: object
    eval: object | None
    stats: dict[str, int]
    cache_hits: int


def build_datasets(cfg, kind: str, stage: str, tokenizer) -> DataBundle:
    """Train/eval datasets of ``kind`` ('sft' | 'preference' | 'prompt') for ``stage`` (sft | rm | dpo | ppo)."""
    d, seed = cfg.data, cfg.training.seed
    specs = d.source_specs
    if not specs:
        raise ConfigError("no training data: set data.train_path or data.sources")
    options = TokenizeOptions(
        template=d.template,
        max_seq_len=d.max_seq_len,
        max_prompt_len=d.max_prompt_len,
        length_policy=d.length_policy,
        schema=d.schema,
        reader_options={"pku_preference": d.pku_preference} if kind == "preference" else {},
    )
    stats: dict[str, int] = {}
    hits = 0
    trains, evals, ratios = [], [], []

    def load(path: str):
        nonlocal hits
        ds = load_tokenized(path, kind, tokenizer, options, d.cache_dir)
        hits += int(ds.cache_hit)
        for k, v in ds.stats.items():
            stats[k] = stats.get(k, 0) + int(v)
        return ds

    for spec in specs:
        _, ratio, path = parse_source(spec)
        ds = load(path)
        if d.data_split is not None:
            ds = Subset(ds, split_indices(len(ds), d.data_split, STAGES[stage], seed))
        if d.eval_path is None and d.eval_fraction > 0:
            w = [1.0 - d.eval_fraction, d.eval_fraction]
            evals.append(Subset(ds, split_indices(len(ds), w, 1, seed + 1)))
            ds = Subset(ds, split_indices(len(ds), w, 0, seed + 1))
        if len(ds) == 0:
            raise DataError(path, None, None, f"no samples left for stage '{stage}' after splits and length policy")
        trains.append(ds)
        ratios.append(ratio)
    train = trains[0] if len(trains) == 1 else BlendedDataset(trains, ratios, seed)
    if d.eval_path:
        eval_ds = load(d.eval_path)
    elif evals:
        eval_ds = evals[0] if len(evals) == 1 else BlendedDataset(evals, ratios, seed, size=sum(len(e) for e in evals))
    else:
        eval_ds = None
    return DataBundle(train=train, eval=eval_ds, stats=stats, cache_hits=hits)
