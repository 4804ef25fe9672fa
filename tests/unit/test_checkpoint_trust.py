"""Checkpoint trust without a process group: the restricted metadata unpickler, the integrity manifest, the resume
config comparison, numeric config validation, and readable positions of bad JSON in data files."""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from mrlhf import integrity, safe_load
from mrlhf.checkpoint import _io_reason, config_changes, read_meta
from mrlhf.config import load_config
from mrlhf.data.formats import iter_records
from mrlhf.errors import CheckpointError, ConfigError, DataError
from mrlhf.safe_load import read_dcp_metadata, torch_load

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "sft_tiny.yaml")


class Payload:
    """What a hostile checkpoint plants: unpickling it runs a shell command (here: creating a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def dcp_metadata(shard_len: int = 64):
    """A small but real torch DCP Metadata: one float tensor in one shard file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    size = torch.Size([4, 4])
    chunks = [ChunkStorageMetadata(torch.Size([0, 0]), size)]
    md = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), size, chunks)
    index = MetadataIndex("w", torch.Size([0, 0]), 0)
    return Metadata({"w": md}, storage_data={index: _StorageInfo("__0_0.distcp", 0, shard_len)})


def make_role_dir(root: Path, metadata_bytes: bytes, shard_len: int = 64) -> Path:
    role = root / "step_00000001" / "actor"
    role.mkdir(parents=True)
    (role / ".metadata").write_bytes(metadata_bytes)
    (role / "__0_0.distcp").write_bytes(b"\0" * shard_len)
    return role


def write_manifest(step: Path) -> None:
    rel = [str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != "meta.json"]
    meta = {"step": 1, "roles": ["actor"], "files": integrity.hash_files(str(step), sorted(rel))}
    (step / "meta.json").write_text(json.dumps(meta))


# ---- item 1: loading never unpickles arbitrary objects ----


def test_real_dcp_metadata_loads_through_the_allow_list(tmp_path):
    role = make_role_dir(tmp_path, pickle.dumps(dcp_metadata()))
    md = read_dcp_metadata(str(role))
    assert md.state_dict_metadata["w"].properties.dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["top", "nested"])
def test_planted_metadata_payload_is_refused_before_it_runs(tmp_path, where):
    marker = tmp_path / "PWNED"
    md = dcp_metadata()
    if where == "nested":  # hidden inside an otherwise valid record
        md.planner_data = {"x": Payload(marker)}
        blob = pickle.dumps(md)
    else:
        blob = pickle.dumps(Payload(marker))
    role = make_role_dir(tmp_path, blob)
    with pytest.raises(CheckpointError, match=r"refused to unpickle '(posix|os)\.system'") as info:
        read_dcp_metadata(str(role))
    assert str(role / ".metadata") in str(info.value)
    assert not marker.exists()


def test_planted_torch_file_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "state.pt"
    torch.save({"rng": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle") as info:
        torch_load(str(path))
    assert str(path) in str(info.value) and not marker.exists()


def test_metadata_pointing_outside_its_directory_is_refused(tmp_path):
    md = dcp_metadata()
    (info,) = md.storage_data.values()
    info.relative_path = "../../etc/passwd"
    role = make_role_dir(tmp_path, pickle.dumps(md))
    with pytest.raises(CheckpointError, match="outside its directory"):
        read_dcp_metadata(str(role))


def test_truncated_metadata_and_shard_name_the_file(tmp_path):
    blob = pickle.dumps(dcp_metadata())
    role = make_role_dir(tmp_path / "a", blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"\.metadata: damaged or truncated"):
        read_dcp_metadata(str(role))
    role = make_role_dir(tmp_path / "b", blob, shard_len=10)  # the metadata places 64 bytes in a 10-byte shard
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated: 10 bytes, but .* up to byte 64"):
        read_dcp_metadata(str(role))
    (role / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: shard file is missing"):
        read_dcp_metadata(str(role))


def _byte_item(value) -> bytes:
    """A .distcp byte item as megatron writes it: ``torch.save`` of the list of a ShardedObject's data."""
    buf = io.BytesIO()
    torch.save([value], buf)
    return buf.getvalue()


def _load_byte_item(raw: bytes, fqn: str = "layer._extra_state/shard_0_1"):
    """What the installed ``DefaultLoadPlanner.load_bytes`` makes of one byte item."""
    planner = types.SimpleNamespace(flatten_state_dict=False, state_dict={})
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn=fqn))
    safe_load._load_bytes(planner, item, io.BytesIO(raw))
    return planner.state_dict[fqn]


def test_byte_item_saved_on_a_gpu_loads_onto_the_cpu():
    """A tensor in a byte item whose storage is tagged 'cuda:0' (as torch.save writes it on a GPU): read onto the CPU,
    which needs no GPU (without map_location torch refuses on a CPU-only machine) and never lands on one."""
    raw = _byte_item(torch.arange(4.0))
    src = zipfile.ZipFile(io.BytesIO(raw))
    pkl = next(n for n in src.namelist() if n.endswith("data.pkl"))
    tagged = src.read(pkl).replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    assert b"cuda:0" in tagged
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            dst.writestr(name, tagged if name == pkl else src.read(name))
    (value,) = _load_byte_item(out.getvalue(), "layer.some_object/shard_0_1")
    assert value.device.type == "cpu" and torch.equal(value, torch.arange(4.0))


# Transformer Engine's _extra_state, written the way TE writes it (TE is not installed here). TE 1.x:
# ``get_extra_state`` returns ``io.BytesIO`` of ``torch.save(state)`` and ``set_extra_state`` does ``torch.load`` of it;
# TE 2.x returns ``torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)`` and ``pickle.loads`` it.
# ``state``: FP8 scales and amax histories, ``extra_fp8_variables`` (python scalars of fp8_meta) and, from TE 2.x,
# the recipe: a dataclass of transformer_engine.common.recipe, whose stand-ins below pickle under TE's names.


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(enum.Enum):
    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)


@dataclasses.dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Any = "max"
    reduce_amax: bool = True


@pytest.fixture
def te_recipe(monkeypatch):
    module = types.ModuleType(safe_load.TE_RECIPE)
    for cls in (_FormatHelper, Format, DelayedScaling):
        monkeypatch.setattr(cls, "__module__", module.__name__)
        setattr(module, cls.__name__, cls)
    for name in ("transformer_engine", "transformer_engine.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def fp8_state(recipe: bool) -> dict:
    state = {
        "scale_fwd": torch.tensor([1.0, 0.5, 2.0]), "scale_inv_fwd": torch.tensor([1.0, 2.0, 0.5]),
        "amax_history_fwd": torch.rand(16, 3), "amax_history_index_fwd": torch.tensor([3], dtype=torch.int32),
        "scale_bwd": torch.ones(2), "scale_inv_bwd": torch.ones(2), "amax_history_bwd": torch.rand(16, 2),
        "extra_fp8_variables": {"fp8_checkpoint": True, "num_gemms": 1, "fp8_max_fwd": 448.0,
                                "fp8_max_bwd": 57344.0, "autocast_id_fwd": 7, "autocast_id_fwd_stack": [7]},
    }  # fmt: skip
    return state | ({"recipe": DelayedScaling(margin=1, amax_history_len=16)} if recipe else {})


def te_extra_state(version: int, state: Any):
    if version == 1:
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


def te_set_extra_state(value) -> Any:
    """How TE decodes what it gets back (TE 1.x: onto its GPU; here the CPU)."""
    if isinstance(value, io.BytesIO):
        value.seek(0)
        return torch.load(value, map_location="cpu", weights_only=False)
    return pickle.loads(value.numpy().tobytes())


def dcp_round_trip(tmp_path: Path, extra_state) -> list:
    """A torch DCP checkpoint holding one weight and one TE ``_extra_state`` byte item (megatron's list of objects),
    loaded through the installed readers (.metadata allow-list, shard checks, byte items)."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    role = tmp_path / "step_00000001" / "actor"
    sd = {"layer.weight": torch.arange(6.0), "layer._extra_state": [extra_state]}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(role)), planner=DefaultSavePlanner(flatten_state_dict=False),
             no_dist=True)  # fmt: skip
    out = {"layer.weight": torch.empty(6), "layer._extra_state": None}
    try:
        dcp.load(out, storage_reader=dcp.FileSystemReader(str(role)), no_dist=True,
                 planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))  # fmt: skip
    except CheckpointException as e:  # a BaseException around the reader's error, as checkpoint.load_model sees it
        raise safe_load.user_error(e) or e from None
    assert torch.equal(out["layer.weight"], torch.arange(6.0))
    return out["layer._extra_state"]


@pytest.mark.parametrize("version", [1, 2], ids=["te1-bytesio", "te2-uint8"])
def test_transformer_engine_extra_state_loads_through_the_allow_list(version, te_recipe, tmp_path):
    state = fp8_state(recipe=version == 2)
    (value,) = dcp_round_trip(tmp_path, te_extra_state(version, state))
    assert isinstance(value, io.BytesIO if version == 1 else torch.Tensor)  # the format TE's set_extra_state takes
    got = te_set_extra_state(value)
    assert got.keys() == state.keys() and got["extra_fp8_variables"] == state["extra_fp8_variables"]
    for key, want in state.items():
        if isinstance(want, torch.Tensor):
            assert torch.equal(got[key], want), key
    assert version == 1 or got["recipe"] == state["recipe"]
    # without FP8, TE 1.x saves torch.save(None); TE 2.x pickle.dumps(None) or an empty tensor
    for empty in [te_extra_state(version, None)] + ([torch.empty(0, dtype=torch.uint8)] if version == 2 else []):
        (value,) = _load_byte_item(_byte_item(empty))
        assert (isinstance(value, torch.Tensor) and value.numel() == 0) or te_set_extra_state(value) is None


class _StorageFromBytes:
    """Pickles as a tensor storage does (``torch.storage._load_from_bytes``, a name the allow-list admits), with a
    planted payload as the storage bytes."""

    def __init__(self, marker: Path) -> None:
        buf = io.BytesIO()
        torch.save(Payload(marker), buf, _use_new_zipfile_serialization=False)
        self.data = buf.getvalue()

    def __reduce__(self):
        from torch.storage import _load_from_bytes

        return (_load_from_bytes, (self.data,))


@pytest.mark.parametrize("case", ["te1", "te2", "te2-storage", "te2-recipe-callable"])
def test_planted_payload_in_transformer_engine_extra_state_is_refused(case, te_recipe, tmp_path):
    marker = tmp_path / "PWNED"
    state = fp8_state(recipe=case != "te1")
    if case == "te2-storage":
        state["scale_fwd"] = _StorageFromBytes(marker)
    elif case == "te2-recipe-callable":
        state["recipe"] = DelayedScaling(amax_compute_algo=Payload(marker))
    else:
        state["extra_fp8_variables"]["fp8_group"] = Payload(marker)
    with pytest.raises(CheckpointError, match="refused to unpickle") as info:
        dcp_round_trip(tmp_path, te_extra_state(1 if case == "te1" else 2, state))
    line = str(info.value)
    assert str(tmp_path / "step_00000001" / "actor" / "__0_0.distcp") in line and "'layer._extra_state'" in line, line
    assert "\n" not in line and not marker.exists()


def test_a_reader_error_inside_nested_dcp_exceptions_is_found():
    """Resharding reads source shards inside DCP's save: the reader's error comes back wrapped twice."""
    from torch.distributed.checkpoint.api import CheckpointException

    inner = CheckpointException("read", {0: (CheckpointError("/ck/actor/__0_0.distcp: damaged"), None)})
    outer = CheckpointException("write", {1: (RuntimeError("other rank"), None), 0: (inner, None)})
    assert str(safe_load.user_error(outer)) == "/ck/actor/__0_0.distcp: damaged"
    assert safe_load.user_error(CheckpointException("write", {0: (OSError(28, "No space"), None)})) is None


# ---- item 2/3: integrity manifest ----


def test_manifest_catches_flipped_truncated_missing_and_unlisted_files(tmp_path):
    role = make_role_dir(tmp_path, pickle.dumps(dcp_metadata()))
    step = role.parent
    write_manifest(step)
    shard = role / "__0_0.distcp"
    integrity.verify_file(str(shard))
    shard.write_bytes(b"\1" + b"\0" * 63)  # same size, one byte changed
    with pytest.raises(CheckpointError, match="content differs from what was saved"):
        integrity.verify_file(str(shard))
    integrity.set_verify(False)
    try:
        integrity.verify_file(str(shard))  # the switch skips hashes ...
        shard.write_bytes(b"\0" * 63)
        with pytest.raises(CheckpointError, match="truncated: 63 bytes, the manifest says 64"):
            integrity.verify_file(str(shard))  # ... never sizes
    finally:
        integrity.set_verify(True)
    shard.unlink()
    with pytest.raises(CheckpointError, match="file is missing"):
        integrity.verify_file(str(shard))
    (role / "extra.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not in the checkpoint's integrity manifest"):
        integrity.verify_file(str(role / "extra.distcp"))


def test_damaged_meta_json_names_file_and_position(tmp_path):
    (tmp_path / "meta.json").write_text('{"step": 2, "roles": ["act')
    with pytest.raises(CheckpointError, match=r"meta\.json: damaged or truncated: .* at line 1, column"):
        read_meta(str(tmp_path))
    (tmp_path / "meta.json").write_bytes(b'{"step": \xff}')
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_meta(str(tmp_path))


def test_save_failure_reasons_are_one_readable_line():
    assert _io_reason(OSError(28, "No space left on device", "/ck/step_2.tmp/ranks/x.pt")) == (
        28, "No space left on device (/ck/step_2.tmp/ranks/x.pt)")  # fmt: skip
    text = "CheckpointException ranks:[0]\nRuntimeError: Worker failure: [Errno 30] Read-only file system: '/ck/a'"
    code, line = _io_reason(RuntimeError(text))
    assert code == 30 and line == "Read-only file system (/ck/a)"
    code, line = _io_reason(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1366"))
    assert code == 28 and "No space left on device" in line


# ---- item 8: resume refuses a changed run ----


def test_config_changes_name_math_settings_and_ignore_neutral_ones():
    saved = load_config(TINY).to_dict()
    now = load_config(TINY, ["training.train_steps=99", "optimizer.lr=1e-3", "logging.log_interval=5",
                             "training.output_dir=/elsewhere", "checkpoint.keep_last=9"]).to_dict()  # fmt: skip
    saved = json.loads(json.dumps(saved, default=str))
    assert config_changes(saved, now) == ["optimizer.lr 0.003 -> 0.001", "training.train_steps 150 -> 99"]
    del saved["training"]["train_steps"]  # a field the saving version did not have is not compared
    assert config_changes(saved, now) == ["optimizer.lr 0.003 -> 0.001"]


# ---- item 5: every numeric field finite and in range ----


@pytest.mark.parametrize(
    "override, key",
    [("optimizer.lr=.nan", "optimizer.lr"), ("optimizer.lr=.inf", "optimizer.lr"), ("optimizer.lr=1e30", "optimizer.lr"),
     ("model.init_std=.nan", "model.init_std"), ("model.init_std=0", "model.init_std"),
     ("optimizer.min_lr=.nan", "optimizer.min_lr"), ("optimizer.beta1=.nan", "optimizer.beta1"),
     ("optimizer.beta2=1.0", "optimizer.beta2"), ("optimizer.eps=0", "optimizer.eps"),
     ("optimizer.clip_grad=-1", "optimizer.clip_grad"), ("optimizer.weight_decay=.nan", "optimizer.weight_decay"),
     ("critic_optimizer.lr=.nan", "critic_optimizer.lr"), ("model.hidden_dropout=1.0", "model.hidden_dropout"),
     ("model.norm_epsilon=-1e-5", "model.norm_epsilon"), ("generation.temperature=.nan", "generation.temperature"),
     ("rm.margin_value=.inf", "rm.margin_value"), ("data.data_split=[1, .nan, 1]", "data.data_split[1]"),
     ("parallel.grad_bucket_mb=.nan", "parallel.grad_bucket_mb"), ("logging.log_interval=0", "logging.log_interval")],
)  # fmt: skip
def test_non_finite_or_out_of_range_numbers_are_refused(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert key in str(info.value), str(info.value)


def test_nan_learning_rate_through_the_cli_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mrlhf.cli", "sft", "--config", TINY, "optimizer.lr=.nan"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("mrlhf: error:") and "'optimizer.lr' must be a finite number" in lines[0]


# ---- item 9: JSON errors at their true line and column ----


def test_jsonl_object_cut_at_end_of_line_is_reported_at_that_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a",\n "response": "b"}\n')
    with pytest.raises(DataError) as info:
        list(iter_records(str(path)))
    msg = str(info.value)
    assert f"{path}:2:" in msg and "column 16" in msg and "one object per line" in msg, msg


def test_jsonl_error_mid_line_keeps_its_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": x}\n')
    with pytest.raises(DataError, match="Expecting value at column 29"):
        list(iter_records(str(path)))


def test_truncated_json_file_is_reported_at_its_last_character(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a",\n "response": "b"},\n\n')
    with pytest.raises(DataError) as info:
        list(iter_records(str(path)))
    msg = str(info.value)
    assert f"{path}:2:" in msg and "line 2, column 19" in msg and "truncated" in msg, msg


def test_large_files_are_hashed_in_pieces_and_a_mismatch_names_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "PIECE", 16)  # pieces of 16 bytes instead of 128 MiB
    role = make_role_dir(tmp_path, pickle.dumps(dcp_metadata()))
    write_manifest(role.parent)
    entry = json.loads((role.parent / "meta.json").read_text())["files"]["actor/__0_0.distcp"]
    assert entry["piece"] == 16 and len(entry["sha256"]) == 4  # 64 bytes
    shard = role / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[40] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"content differs from what was saved in bytes 32-48"):
        integrity.verify_file(str(shard))


def test_whole_file_digest_entries_verify_and_malformed_entries_blame_the_manifest(tmp_path):
    import hashlib

    role = make_role_dir(tmp_path, pickle.dumps(dcp_metadata()))
    step = role.parent
    shard = role / "__0_0.distcp"
    data = shard.read_bytes()
    whole = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # one string: the file's sha256sum
    (step / "meta.json").write_text(json.dumps({"step": 1, "roles": ["actor"], "files": {"actor/__0_0.distcp": whole}}))
    integrity.verify_file(str(shard))  # a matching whole-file digest is accepted ...
    shard.write_bytes(b"\1" + data[1:])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: content differs from what was saved in the file"):
        integrity.verify_file(str(shard))  # ... and a changed byte is still found
    for bad in ({"size": len(data), "sha256": 7}, {"size": len(data), "sha256": []}, {"size": "64", "sha256": ["a"]},
                ["not", "an", "object"]):  # fmt: skip
        (step / "meta.json").write_text(json.dumps({"step": 1, "files": {"actor/__0_0.distcp": bad}}))
        with pytest.raises(CheckpointError, match=r"meta\.json: the integrity manifest.* malformed"):
            integrity.verify_file(str(shard))
