"""HF weight files: lazy, safe reading (safetensors, sharded safetensors, ``pytorch_model.bin``) and sharded writing.

:class:`WeightReader` learns names, shapes and dtypes from file headers only. Tensors are read on demand, and
only the requested slice (``safe_open(...).get_slice``); each safetensors file is opened for one read and closed
right after, so no file stays memory-mapped and a rank's peak memory is its own shard plus the tensor being read,
not the checkpoint. :class:`SafetensorsWriter` writes the other way, tensor by tensor. Pickled ``.bin`` files load only through ``torch.load(weights_only=True)``: a pickle that
carries code is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import torch

from mrlhf.convert.hf_config import read_json
from mrlhf.errors import ConversionError

SAFE_INDEX, SAFE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class WeightReader:
    """The tensors of one HF model directory, by name; nothing is read until :meth:`read`."""

    def __init__(self, source: str) -> None:
        self.source = source
        """The index or single weight file, for messages."""
        self.files: dict[str, str] = {}
        """Tensor name -> file holding it."""
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._bin: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, hf_dir: str) -> WeightReader:
        """Index the weights of ``hf_dir``: sharded or single safetensors first, then (sharded) pytorch_model.bin."""
        for name in (SAFE_INDEX, SAFE, BIN_INDEX, BIN):
            path = os.path.join(hf_dir, name)
            if os.path.isfile(path):
                break
        else:
            raise ConversionError(f"{hf_dir}: no weights found (looked for {SAFE_INDEX}, {SAFE}, {BIN_INDEX}, {BIN})")
        if name.endswith(".index.json"):
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{path}: field 'weight_map' is missing or empty")
            shards = sorted(set(weight_map.values()))
        else:
            weight_map, shards = None, [name]
        reader = cls(path)
        for shard in shards:
            shard_path = os.path.join(hf_dir, shard)
            if not os.path.isfile(shard_path):
                raise ConversionError(f"{path}: names weight file {shard}, which does not exist")
            for key, (shape, dtype) in reader._scan(shard_path).items():
                if key in reader.files:
                    raise ConversionError(f"{shard_path}: tensor {key} is also in {reader.files[key]}")
                reader.files[key], reader.shapes[key], reader.dtypes[key] = shard_path, shape, dtype
        for key, shard in (weight_map or {}).items():
            if reader.files.get(key) != os.path.join(hf_dir, shard):
                raise ConversionError(f"{path}: maps {key} to {shard}, which does not hold it")
        return reader

    def _scan(self, path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if path.endswith(".bin"):
            return {k: (tuple(t.shape), t.dtype) for k, t in self._load_bin(path).items()}
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                    out[key] = (tuple(sl.get_shape()), dtype)
        except ConversionError:
            raise
        except Exception as e:  # SafetensorError for truncated/corrupt files, OSError
            raise ConversionError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
        return out

    def _load_bin(self, path: str) -> dict[str, torch.Tensor]:
        if path in self._bin:
            return self._bin[path]
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConversionError(
                f"{path}: refused to load: the pickle holds more than tensors (torch.load weights_only=True "
                f"failed: {first}); convert it to safetensors with code you trust"
            ) from None
        except Exception as e:
            raise ConversionError(f"{path}: cannot read: {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConversionError(f"{path}: expected a flat dict of tensors")
        self._bin[path] = sd
        return sd

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Tensor ``key``, or its [start, stop) slice along ``dim``; only those bytes are read."""
        path = self.files[key]
        index = (slice(None),) * (dim or 0) + (slice(start, stop),) if dim is not None else None
        if path.endswith(".bin"):
            t = self._load_bin(path)[key]
            return t if index is None else t[index]
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key) if index is None else f.get_slice(key)[index]
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {key}: {e}") from None

    def dominant_dtype(self) -> torch.dtype:
        """The dtype most of the weights have (the precision a conversion keeps by default)."""
        counts: dict[torch.dtype, int] = {}
        for key, dtype in self.dtypes.items():
            counts[dtype] = counts.get(dtype, 0) + _numel(self.shapes[key])
        return max(counts, key=counts.get)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 500 * 2**20, '1000' -> 1000 (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 2GB, 500MB, 1GiB or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = int(number * scale[unit])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r} must be positive")
    return size


_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class SafetensorsWriter:
    """Size-sharded safetensors written tensor by tensor, so a writer holds one tensor, not a shard.

    Shards and headers are planned up front from (name, shape, dtype): ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards of at most ``max_bytes`` each (a bigger tensor gets a shard of its
    own) plus ``model.safetensors.index.json``. Each :meth:`write` puts a tensor's bytes at its planned place;
    :meth:`close` checks every tensor was written. The files are the format ``safetensors.torch.save_file`` writes
    (little-endian header length, JSON header padded to 8 bytes, tensors back to back).
    """

    def __init__(self, out_dir: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> None:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for key, shape, dtype in entries:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(shape), dtype, nbytes))
            size += nbytes
        single = len(shards) == 1
        self.names = (
            [SAFE] if single else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self.out_dir, self.places, self.files, self.pending = out_dir, {}, [], set()
        self.total = 0
        for name, shard in zip(self.names, shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            begin = 0
            for key, shape, dtype, nbytes in shard:
                header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
                begin += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f = open(os.path.join(out_dir, name), "wb+")  # noqa: SIM115 - closed in close()
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + begin)
            self.files.append(f)
            for key, shape, dtype, _ in shard:
                start = 8 + len(raw) + header[key]["data_offsets"][0]  # type: ignore[index]
                self.places[key] = (f, start, shape, dtype, name)
                self.pending.add(key)
            self.total += begin

    def write(self, key: str, tensor: torch.Tensor) -> None:
        f, start, shape, dtype, _ = self.places[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"{key}: writing {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}")
        f.seek(start)
        f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.pending.discard(key)

    def close(self) -> list[str]:
        """Close the files, write the index of a sharded checkpoint; returns the file names written."""
        for f in self.files:
            f.close()
        if self.pending:
            raise ConversionError(f"{self.out_dir}: tensors planned but never written: {sorted(self.pending)[:5]}")
        if len(self.names) == 1:
            return list(self.names)
        weight_map = {key: place[4] for key, place in self.places.items()}
        with open(os.path.join(self.out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return self.names + [SAFE_INDEX]

