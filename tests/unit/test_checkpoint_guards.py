"""Checkpoint guards that need no process group: incomplete checkpoints, tokenizer mismatch between roles."""

import json

import pytest

from mrlhf.checkpoint import latest_checkpoint, read_meta
from mrlhf.errors import CheckpointError
from mrlhf.trainers.common import check_tokenizer


def make_ckpt(root, name="step_00000002", meta=True, tokenizer_hash="a" * 64):
    d = root / name
    d.mkdir(parents=True)
    if meta:
        (d / "meta.json").write_text(json.dumps({"step": 2, "tokenizer_hash": tokenizer_hash, "roles": ["actor"]}))
    (root / "latest").write_text(name)
    return d


def test_latest_and_meta(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    d = make_ckpt(tmp_path)
    assert latest_checkpoint(str(tmp_path)) == str(d)
    assert read_meta(str(d))["step"] == 2


def test_tracker_pointing_at_incomplete_checkpoint_is_an_error(tmp_path):
    make_ckpt(tmp_path, meta=False)
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        latest_checkpoint(str(tmp_path))


def test_tokenizer_mismatch_between_roles_is_refused(tmp_path):
    d = make_ckpt(tmp_path)
    check_tokenizer(str(d), "a" * 64)  # same tokenizer: fine
    with pytest.raises(CheckpointError, match="token ids would not match"):
        check_tokenizer(str(d), "b" * 64)
