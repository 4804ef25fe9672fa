"""Reading checkpoints without running their code: every unpickling on the load path is restricted.

A checkpoint directory is untrusted input (it comes from colleagues and hubs), and pickle runs whatever a file
tells it to. megatron's ``dist_checkpointing`` (torch DCP underneath) unpickles in three places: each role's
``.metadata`` (plain ``pickle.load`` in ``FileSystemReader.read_metadata``), the byte items inside ``.distcp`` shards
(``torch.load(weights_only=False)`` in ``DefaultLoadPlanner.load_bytes``) and ``common.pt`` (``torch.load`` with
torch's default, which an environment variable can turn unsafe). :func:`install` replaces those three readers, for
every caller in the process (resume, ``checkpoint.load_dir``, ``mrlhf generate``, conversion, resharding,
inspection):

- ``.metadata`` goes through :class:`MetadataUnpickler`, which builds only the DCP metadata records, ``torch.Size``,
  dtypes and layouts; any other global (``os.system``, ``builtins.eval``, a class with a ``__reduce__``) is refused
  before it is looked up, naming the file;
- byte items and ``common.pt`` load with ``torch.load(weights_only=True)`` onto the CPU (tensors, containers, numbers,
  strings);
- Transformer Engine's ``_extra_state`` byte items hold a second serialization that TE's ``set_extra_state`` unpickles
  itself (TE 1.x: a ``BytesIO`` of ``torch.save(state)``; TE 2.x: a uint8 tensor of ``pickle.dumps(state)``; the state
  is FP8 scales and amax histories, python scalars and TE's recipe records). :func:`sanitize_extra_state` reads that
  inner state with the same restrictions (:class:`ExtraStateUnpickler` for the pickled form) and hands TE a fresh
  serialization of what it read, so TE never unpickles bytes from the file;
- tensor data was already read with ``weights_only=True`` by torch; the per-rank ``ranks/*.pt`` files are read the
  same way by :mod:`mrlhf.checkpoint`.

The replaced readers also check what they read: sizes and hashes against the integrity manifest
(:mod:`mrlhf.integrity`), shard files the metadata points at (present, long enough, inside the directory), and
every failure becomes one :class:`CheckpointError` naming the file -- instead of a traceback, or torch's
``CheckpointException`` (a ``BaseException``, which ``except Exception`` does not catch; :func:`user_error` finds the
CheckpointError a reader raised inside one, however deeply DCP nested it).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import Any

import torch

from mrlhf import integrity
from mrlhf.errors import CheckpointError, MrlhfError

_DCP = "torch.distributed.checkpoint"
ALLOWED: dict[str, set[str]] = {
    f"{_DCP}.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                         "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    f"{_DCP}.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
                        "LoadItemType", "BytesIOWriteData"},
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}  # fmt: skip
"""Globals a DCP ``.metadata`` pickle may name (plus torch dtypes): plain records of tensor shapes and file offsets."""


class AllowListUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals of ``allowed`` (module -> names), torch dtypes and the
    ``replaced`` ones (``(module, name)`` -> the object to use instead); any other global is :meth:`refusal`."""

    allowed: dict[str, set[str]] = {}
    replaced: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.replaced:
            return self.replaced[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name not in self.allowed.get(module, ()):
            raise self.refusal(module, name)
        try:
            return super().find_class(module, name)
        except ImportError:
            raise self.missing(module, name) from None

    def refusal(self, module: str, name: str) -> CheckpointError:
        raise NotImplementedError

    def missing(self, module: str, name: str) -> CheckpointError:
        return CheckpointError(f"refused to unpickle '{module}.{name}': its module is not installed")


class MetadataUnpickler(AllowListUnpickler):
    """Unpickles a DCP ``.metadata`` file, refusing every global outside :data:`ALLOWED`."""

    allowed = ALLOWED

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def refusal(self, module: str, name: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: refused to unpickle '{module}.{name}': checkpoint metadata holds only tensor shapes and "
            "file offsets, so this file was not written by a checkpoint save (it may be an attack)"
        )


def read_dcp_metadata(role_dir: str, rank: int | None = None) -> Any:
    """The DCP metadata of a role directory, read safely and checked against the files it points at."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = os.path.join(str(role_dir), ".metadata" if rank is None else f"__{rank}.metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file is missing (the role directory holds no complete dist checkpoint)")
    integrity.verify_file(path)
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except MrlhfError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, ValueError, ... on damaged bytes
        raise CheckpointError(f"{path}: damaged or truncated checkpoint metadata ({_first_line(e)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not checkpoint metadata (holds a {type(metadata).__name__})")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    check_shards(str(role_dir), metadata, path)
    return metadata


def check_shards(role_dir: str, metadata: Any, source: str) -> None:
    """Every shard file the metadata names is a plain file name in ``role_dir``, present, and long enough for the
    byte ranges placed in it (catches a missing or truncated shard with one ``stat`` each, manifest or not)."""
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise CheckpointError(f"{source}: names a shard outside its directory ({rel!r}); refusing to read it")
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        path = os.path.join(role_dir, rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CheckpointError(f"{path}: shard file is missing ({source} places saved tensors in it)") from None
        if size < end:
            raise CheckpointError(f"{path}: truncated: {size} bytes, but {source} places data up to byte {end}")


def torch_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file after its integrity check, with the numpy types RNG
    states need; any failure names the file."""
    import numpy as np

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file is missing")
    integrity.verify_file(path)
    safe = [np.ndarray, np.dtype, type(np.dtype("uint32")), np.core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain data "
                f"({_refused_global(e)}); it was not written by a checkpoint save (it may be an attack)"
            ) from None
        raise CheckpointError(f"{path}: damaged or truncated ({_first_line(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: damaged or truncated ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _refused_global(e: BaseException) -> str:
    for line in str(e).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")
    return _first_line(e)


# ----------------------------------------------------------------------------------------------------------------------
# The replaced readers


def _read_metadata(self, *args: Any, **kwargs: Any) -> Any:
    metadata = read_dcp_metadata(str(self.path), kwargs.get("rank"))
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _read_data(self, plan: Any, planner: Any) -> torch.futures.Future:
    """torch's ``read_data`` one shard file at a time, each verified first, so a failure names its file."""
    root = str(self.path)
    per_file: dict[str, list[Any]] = {}
    for item in plan.items:
        per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
    integrity.verify_files([os.path.join(root, rel) for rel in per_file])
    for rel, items in per_file.items():
        path = os.path.join(root, rel)
        try:
            _ORIGINAL["read_data"](self, dataclasses.replace(plan, items=items), planner).wait()
        except MrlhfError as e:  # a byte item refused by _load_bytes
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:
            raise CheckpointError(f"{path}: damaged tensor data ({_first_line(e)})") from None
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(None)
    return done


def _load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    try:
        # on the CPU: a byte item saved on a GPU must not need one (or land on it) to be read; BytesIO is TE 1.x's
        # _extra_state, whose contents sanitize_extra_state reads
        with torch.serialization.safe_globals([io.BytesIO]):
            obj = torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"saved object '{fqn}' holds more than tensors and plain data ({_refused_global(e)}); "
                              "refused to unpickle it (it may be an attack)") from None  # fmt: skip
    obj = sanitize_extra_state(obj, fqn)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


TE_RECIPE = "transformer_engine.common.recipe"
EXTRA_STATE_ALLOWED: dict[str, set[str]] = {
    "torch._utils": {"_rebuild_tensor_v2"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    TE_RECIPE: {"DelayedScaling", "Float8CurrentScaling", "MXFP8BlockScaling", "Float8BlockScaling",
                "NVFP4BlockScaling", "Format", "_FormatHelper", "_OverrideLinearPrecision", "MMParams", "QParams"},
}  # fmt: skip
"""Globals TE's pickled ``_extra_state`` may name: tensors, and the plain records (dataclasses, enums, named tuples)
of TE's FP8 recipes. A recipe holding a function (``amax_compute_algo=<callable>``, ``CustomRecipe``) is refused."""


def _storage_from_bytes(data: bytes) -> Any:
    """What a pickled tensor's storage names (``torch.storage._load_from_bytes``, which is ``torch.load`` with
    ``weights_only=False``), read the safe way."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class ExtraStateUnpickler(AllowListUnpickler):
    """Unpickles the state TE 2.x pickles into its ``_extra_state`` tensor, refusing every global outside
    :data:`EXTRA_STATE_ALLOWED` (and tensor storages read with ``weights_only=True``)."""

    allowed = EXTRA_STATE_ALLOWED
    replaced = {("torch.storage", "_load_from_bytes"): _storage_from_bytes}

    def __init__(self, file: Any, what: str) -> None:
        super().__init__(file)
        self.what = what

    def refusal(self, module: str, name: str) -> CheckpointError:
        return CheckpointError(
            f"saved object {self.what} names '{module}.{name}': Transformer Engine's FP8 state holds only "
            "tensors, numbers and recipe records; refused to unpickle it (it may be an attack)"
        )

    def missing(self, module: str, name: str) -> CheckpointError:
        return CheckpointError(f"saved object {self.what} holds Transformer Engine FP8 state ('{module}.{name}'), "
                               "and transformer_engine is not installed")  # fmt: skip


def sanitize_extra_state(obj: Any, fqn: str) -> Any:
    """``obj`` (a loaded byte item; megatron saves a list of objects) with every Transformer Engine extra state in it
    read safely and serialized afresh in the same format: TE's ``set_extra_state`` then unpickles bytes written here
    from plain records, never the file's (which the restricted readers parse, but a second, unrestricted reader of
    the same bytes is an attack surface of its own). Anything else is returned as it is."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(sanitize_extra_state(x, fqn) for x in obj)
    what = f"'{fqn}'"
    try:
        if isinstance(obj, io.BytesIO):  # TE 1.x: torch.save(state)
            state = torch.load(io.BytesIO(obj.getvalue()), map_location="cpu", weights_only=True)
            fresh = io.BytesIO()
            torch.save(state, fresh)
            fresh.seek(0)
            return fresh
        if isinstance(obj, torch.Tensor) and obj.dtype == torch.uint8 and obj.numel() and "_extra_state" in fqn:
            state = ExtraStateUnpickler(io.BytesIO(obj.numpy().tobytes()), what).load()  # TE 2.x: pickle.dumps(state)
            return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
    except MrlhfError:
        raise
    except Exception as e:  # torch's refusal is an UnpicklingError too; anything else is damaged bytes
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(
                f"saved object {what} holds Transformer Engine state with more than tensors and plain data "
                f"({_refused_global(e)}); refused to unpickle it (it may be an attack)"
            ) from None
        raise CheckpointError(f"saved object {what}: damaged Transformer Engine state ({_first_line(e)})") from None
    return obj


def user_error(e: BaseException) -> MrlhfError | None:
    """The MrlhfError a checkpoint reader or writer raised inside torch DCP: DCP hands it back wrapped in its
    ``CheckpointException`` (``failures``: rank -> (exception, traceback)), and twice when a read runs inside a save
    (resharding reads each source shard while DCP writes the target). The lowest rank's, so every rank finds the
    same one; None when the failure is not such an error."""
    if isinstance(e, MrlhfError):
        return e
    for _, (exc, _tb) in sorted((getattr(e, "failures", None) or {}).items()):
        found = user_error(exc)
        if found is not None:
            return found
    return None


def _load_common(self, checkpoint_dir: Any) -> Any:
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    return torch_load(os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME), map_location="cpu")


_ORIGINAL: dict[str, Any] = {}


def install() -> None:
    """Route every DCP/megatron checkpoint read in this process through the readers above (idempotent)."""
    if _ORIGINAL:
        return
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    _ORIGINAL["read_data"] = FileSystemReader.read_data
    _ORIGINAL["read_metadata"] = FileSystemReader.read_metadata
    FileSystemReader.read_metadata = _read_metadata
    FileSystemReader.read_data = _read_data
    DefaultLoadPlanner.load_bytes = _load_bytes
    TorchCommonLoadStrategy.load_common = _load_common
