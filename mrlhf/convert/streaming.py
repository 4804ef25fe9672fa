"""Streaming reads and writes for the conversion tools: a conversion holds about one tensor at a time, not a model.

- :func:`meta_role_model` builds a rank's RoleModel on the ``meta`` device: shapes, names and megatron's sharded
  state dict, no memory.
- :class:`LazySaveStrategy` is megatron's own ``torch_dist`` save (same files, metadata, sharding validation and
  ``common.pt``; any megatron loads the result) whose tensors are *produced on demand*: torch's synchronous
  single-threaded writer asks for one tensor, writes it and drops it before asking for the next. megatron's default
  writer instead resolves every tensor of the rank up front (it is built for async saves of live models).
- :class:`ChunkReader` reads any box ``[offsets, offsets + sizes)`` of a saved tensor, touching only the stored pieces
  that overlap it (resharding reads exactly a target shard; export reads one parameter).
- ``weights.SafetensorsWriter`` (beside the HF reader) writes size-sharded safetensors tensor by tensor.

Producers receive megatron ``ShardedTensor``s whose ``data`` is a meta view of a meta parameter; they return the
real tensor with that view's shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mrlhf.errors import ConversionError, MrlhfError

Producer = Callable[[ShardedTensor], torch.Tensor]


def meta_role_model(cfg, role: str, vocab: int, first: bool, last: bool):
    """This rank's stage of ``role`` with every parameter on the meta device (nothing allocated, nothing drawn)."""
    from mrlhf.models.roles import RoleModel

    with torch.device("meta"):
        model = RoleModel(cfg, role, vocab, first, last)
    return model.to(cfg.to_transformer_config().params_dtype)


def shard_box(sh: ShardedTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of a megatron ShardedTensor's data inside its global tensor (prepended axes included)."""
    sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(sh.global_offset), sizes


def view_of(real: torch.Tensor, meta_view: torch.Tensor) -> torch.Tensor:
    """The view of ``real`` that ``meta_view`` is of its (meta) base: same size, stride and offset."""
    base = base_of(meta_view)
    assert real.is_contiguous() and base.is_contiguous() and real.shape == base.shape
    offset = real.storage_offset() + meta_view.storage_offset() - base.storage_offset()
    return real.as_strided(meta_view.size(), meta_view.stride(), offset)


def base_of(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


class _LazySavePlanner(MCoreSavePlanner):
    """megatron's save planner; a tensor still on the meta device is produced when the writer asks for it."""

    def __init__(self, pending: dict[tuple, ShardedTensor], produce: Producer, **kw) -> None:
        super().__init__(**kw)
        self.pending, self.produce = pending, produce

    def resolve_data(self, write_item):
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, torch.Tensor) and obj.is_meta:
            index = write_item.index
            sh = self.pending.get((index.fqn, tuple(index.offset)))
            if sh is None:
                raise RuntimeError(f"{index.fqn} at {list(index.offset)}: a meta tensor with no producer")
            real = self.produce(sh)
            if tuple(real.shape) != tuple(sh.data.shape) or real.dtype != obj.dtype:
                raise ConversionError(
                    f"{sh.key}: produced {list(real.shape)} {real.dtype}, expected {list(sh.data.shape)} {obj.dtype}"
                )
            obj = real.contiguous().view(obj.shape)
        return self.transform_object(write_item, obj)


class LazySaveStrategy(TorchDistSaveShardedStrategy):
    """Pass as ``sharded_strategy`` to ``dist_checkpointing.save``: meta-device tensors come from ``produce``."""

    def __init__(self, produce: Producer) -> None:
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self.produce = produce

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        # Remember each meta ShardedTensor as it is now (its data a view of its parameter) under the index DCP will
        # ask for -- (key, global offset) -- and hand megatron a contiguous placeholder, which it may reshape freely.
        pending: dict[tuple, ShardedTensor] = {}

        def swap(x: Any) -> Any:
            if isinstance(x, ShardedTensor) and x.data is not None and x.data.is_meta:
                pending[(x.key, tuple(x.global_offset))] = dataclasses.replace(x)
                x.data = torch.empty(x.data.shape, dtype=x.data.dtype, device="meta")
            return x

        dict_list_map_inplace(swap, sharded_state_dict)
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        planner = _LazySavePlanner(pending, self.produce, dedup_replicated_tensors=False, flatten_state_dict=False)
        writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=True, sync_files=True, thread_count=1)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
        except CheckpointException as e:
            # DCP gathers every rank's failure into one exception; a producer's own error (a file that cannot be
            # read, a shape that does not fit) is the message the user needs, on every rank.
            for exc, _ in e.failures.values():
                if isinstance(exc, MrlhfError):
                    raise exc from None
            raise

    def async_save(self, sharded_state_dict, checkpoint_dir):  # pragma: no cover - guard
        raise NotImplementedError("LazySaveStrategy saves synchronously")


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads one box of one saved tensor into ``dest``."""

    def __init__(self, fqn: str, offsets: tuple[int, ...], dest: torch.Tensor) -> None:
        super().__init__()
        self.fqn, self.offsets, self.dest = fqn, offsets, dest

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.fqn]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.dest.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.fqn, md, [chunk]))

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.dest


class ChunkReader:
    """Boxes of the tensors of one saved role directory (megatron torch_dist), without a process group."""

    def __init__(self, role_dir: str) -> None:
        self.role_dir = role_dir
        self.reader = FileSystemReader(role_dir)
        self.metadata = self.reader.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        # a checkpoint written with Transformer Engine layers names its fused norms differently: answer to the
        # local layers' names too (models/keymap.py)
        from mrlhf.models.keymap import te_to_local

        self.aliases = {te_to_local(k): k for k in self.tensors if te_to_local(k) != k}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def _stored(self, key: str) -> str:
        return key if key in self.tensors else self.aliases.get(key, key)

    def _md(self, key: str) -> TensorStorageMetadata:
        md = self.tensors.get(self._stored(key))
        if md is None:
            raise ConversionError(f"{self.role_dir}: no tensor '{key}' in this checkpoint")
        return md

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``key``'s box [offsets, offsets + sizes), in its saved dtype."""
        md = self._md(key)
        key = self._stored(key)
        if len(offsets) != len(md.size) or any(o + s > n for o, s, n in zip(offsets, sizes, md.size)):
            raise ConversionError(
                f"{self.role_dir}: tensor '{key}' has shape {list(md.size)}; cannot read "
                f"[{', '.join(f'{o}:{o + s}' for o, s in zip(offsets, sizes))}]"
            )
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        dcp.load({key: dest}, storage_reader=_Cached(self), planner=_ChunkLoadPlanner(key, offsets, dest), no_dist=True)
        return dest

    def read_shard(self, sh: ShardedTensor) -> torch.Tensor:
        """The data of a (meta) ShardedTensor at its place in the saved tensor, shaped like its data."""
        offsets, sizes = shard_box(sh)
        return self.read(sh.key, offsets, sizes).view(sh.data.shape)


class _Cached(FileSystemReader):
    """A FileSystemReader that reuses a ChunkReader's metadata instead of unpickling it per read."""

    def __init__(self, chunks: ChunkReader) -> None:
        super().__init__(chunks.role_dir)
        self._metadata = chunks.metadata

    def read_metadata(self, *args, **kwargs):
        return self._metadata


def sharded_tensors(model) -> list[ShardedTensor]:
    """The ShardedTensors of a model's sharded state dict, factories applied (e.g. SwiGLU's fc1 halves)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return [x for x in nested_values(sd) if isinstance(x, ShardedTensor)]


def assemble_parameters(model, names: dict[int, str]) -> dict[str, list[ShardedTensor]]:
    """Parameter name -> the ShardedTensors that cover it (views of it), for filling it from a ChunkReader.
    ``names`` maps id(parameter) to its name."""
    out: dict[str, list[ShardedTensor]] = {}
    for sh in sharded_tensors(model):
        name = names.get(id(base_of(sh.data)))
        if name is None:
            raise ConversionError(f"{sh.key}: not a view of any parameter")
        out.setdefault(name, []).append(sh)
    return out
