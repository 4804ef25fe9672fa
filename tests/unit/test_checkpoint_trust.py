"""Checkpoint trust without a process group: the restricted metadata unpickler, the integrity manifest, the resume
config comparison, numeric config validation, and readable positions of bad JSON in data files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrlhf import integrity
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
