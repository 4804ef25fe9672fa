"""Checkpoints you can trust, as a user meets them: planted pickles never run on any entry point (resume,
``checkpoint.load_dir``, generate, inspect, export, reshard), damaged files are one error naming the file (the same on
every rank), checkpoints from before the integrity manifest still load, a changed run is refused on resume, NaN
weights are never saved and an always-NaN run stops."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from harness import run_ranks
from sft_runs import assert_bitwise_equal_params, sft_rank
from trust_runs import flip_byte, generate_rank, load_dir_rank, plant, resume_rank, save_non_finite_rank, truncate

STEP2 = "step_00000002"
RUN = ["training.train_steps=4", "checkpoint.save_interval=2", "training.eval_samples=8"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A dp2 run of 4 steps saved at 2 and 4; the copy handed to tests stops at step 2 (latest = step 2), and the
    uninterrupted run's final parameters are what resuming it must reproduce."""
    base = tmp_path_factory.mktemp("trust")
    full = run_ranks(sft_rank, 2, str(base / "run"), {}, RUN)
    ckpts = base / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text(STEP2)
    return base / "run", full


@pytest.fixture
def run_dir(interrupted, tmp_path):
    src, _ = interrupted
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def step_dir(run_dir) -> str:
    return str(run_dir / "checkpoints" / STEP2)


def errors(results: list[dict]) -> list[str]:
    assert all("error" in r for r in results), results
    assert len({r["error"] for r in results}) == 1, "every rank must raise the same error"
    return results[0]["error"]


def test_resume_checks_the_manifest_and_equals_the_uninterrupted_run(interrupted, run_dir):
    _, full = interrupted
    step = step_dir(run_dir)
    meta = json.load(open(os.path.join(step, "meta.json")))
    on_disk = sorted(os.path.relpath(os.path.join(d, f), step) for d, _, fs in os.walk(step) for f in fs)
    assert sorted(meta["files"]) == [f for f in on_disk if f != "meta.json"]  # every file but the manifest itself
    assert {"actor/.metadata", "actor/common.pt", "ranks/tp0_pp0_dp0.pt", "ranks/tp0_pp0_dp1.pt"} <= set(meta["files"])
    resumed = run_ranks(resume_rank, 2, str(run_dir), RUN)
    assert_bitwise_equal_params(full, resumed)


def test_checkpoint_saved_before_manifests_still_loads_bitwise(interrupted, run_dir):
    """Manifests are the only change to the format: a meta.json without ``files`` is what older saves wrote."""
    _, full = interrupted
    meta_path = os.path.join(step_dir(run_dir), "meta.json")
    meta = json.load(open(meta_path))
    del meta["files"]
    json.dump(meta, open(meta_path, "w"))
    resumed = run_ranks(resume_rank, 2, str(run_dir), RUN)
    assert_bitwise_equal_params(full, resumed)


@pytest.mark.parametrize("where", ["metadata", "common", "bytes_item", "ranks"])
def test_planted_pickle_payload_never_runs(where, run_dir, tmp_path):
    from mrlhf.convert.export_hf import convert_mrlhf_to_hf
    from mrlhf.convert.reshard import inspect_checkpoint, reshard_checkpoint
    from mrlhf.errors import MrlhfError

    marker = tmp_path / "PWNED"
    planted = plant(step_dir(run_dir), where, str(marker))
    ckpts = str(run_dir / "checkpoints")
    seen = {"resume": errors(run_ranks(resume_rank, 2, str(run_dir), RUN))}
    if where != "ranks":  # the per-rank state is read on resume only
        seen["load_dir"] = run_ranks(load_dir_rank, 1, str(tmp_path / "new"), ckpts)[0]["error"]
        seen["generate"] = run_ranks(generate_rank, 1, ckpts)[0]["error"]
    if where == "metadata":  # the tools read the metadata (export and reshard also the tensors)
        tools = {"inspect": (inspect_checkpoint, ckpts), "export": (convert_mrlhf_to_hf, ckpts, str(tmp_path / "hf")),
                 "reshard": (reshard_checkpoint, ckpts, str(tmp_path / "tp2"), 2, 1)}  # fmt: skip
        for name, (fn, *args) in tools.items():
            with pytest.raises(MrlhfError) as info:
                fn(*args)
            seen[name] = str(info.value)
    for entry, line in seen.items():
        assert "refused to unpickle" in line and planted in line, (entry, line)
    assert not marker.exists(), "a planted payload ran"


def test_flipped_bytes_in_a_shard_are_refused_unless_verification_is_off(interrupted, run_dir, tmp_path):
    from mrlhf.convert.export_hf import convert_mrlhf_to_hf
    from mrlhf.errors import MrlhfError

    shard = os.path.join(step_dir(run_dir), "actor", "__0_1.distcp")
    flip_byte(shard)
    ckpts = str(run_dir / "checkpoints")
    lines = [errors(run_ranks(resume_rank, 2, str(run_dir), RUN)),
             run_ranks(load_dir_rank, 1, str(tmp_path / "new"), ckpts)[0]["error"],
             run_ranks(generate_rank, 1, ckpts)[0]["error"]]  # fmt: skip
    # export reads tensors inside torch DCP, which wraps the error in its CheckpointException; the conversion runtime
    # finds the reader's error in it (test_trust_convert.py runs the tools' command lines)
    with pytest.raises(MrlhfError) as info:
        convert_mrlhf_to_hf(ckpts, str(tmp_path / "hf"))
    for line in lines + [str(info.value)]:
        assert line.startswith(f"{shard}: content differs from what was saved"), line
        assert "\n" not in line, line
    # checkpoint.verify_integrity=false: sizes only -- the flipped byte goes unnoticed, as before manifests
    resumed = run_ranks(resume_rank, 2, str(run_dir), RUN, False)
    assert all("losses" in r for r in resumed)


DAMAGE = {
    "truncated shard": ("actor/__0_0.distcp", truncate, "truncated"),
    "missing shard": ("actor/__0_1.distcp", os.remove, "missing"),
    "garbage mid-shard": ("actor/__0_0.distcp", flip_byte, "content differs"),
    "truncated .metadata": ("actor/.metadata", truncate, "truncated"),
    "truncated metadata.json": ("actor/metadata.json", truncate, "truncated"),
    "missing common.pt": ("actor/common.pt", os.remove, "missing"),
    "truncated rank state": ("ranks/tp0_pp0_dp1.pt", truncate, "truncated"),
    "garbage mid rank state": ("ranks/tp0_pp0_dp1.pt", flip_byte, "content differs"),
    "truncated meta.json": ("meta.json", truncate, "damaged or truncated"),
}


# Without a manifest, same-size damage to tensor bytes is undetectable (the reason for hashes), and meta.json is the
# manifest: those cases run with a manifest only.
DAMAGE_CASES = [(case, True) for case in DAMAGE] + [
    (case, False) for case, (rel, _, _) in DAMAGE.items() if "garbage" not in case and rel != "meta.json"
]


@pytest.mark.parametrize("case, manifest", DAMAGE_CASES,
                         ids=[f"{c}-{'manifest' if m else 'no-manifest'}" for c, m in DAMAGE_CASES])  # fmt: skip
def test_damaged_file_is_one_error_naming_it_on_every_rank(case, manifest, run_dir):
    rel, damage, what = DAMAGE[case]
    step = step_dir(run_dir)
    if not manifest:
        meta = json.load(open(os.path.join(step, "meta.json")))
        del meta["files"]
        json.dump(meta, open(os.path.join(step, "meta.json"), "w"))
        what = {"truncated": "truncated", "missing": "missing"}[what]
    path = os.path.join(step, rel)
    damage(path)
    line = errors(run_ranks(resume_rank, 2, str(run_dir), RUN))
    assert path in line and what in line, line
    assert "\n" not in line and "Traceback" not in line


def test_changed_train_steps_on_resume_is_refused_with_the_diff(run_dir):
    changed = ["training.train_steps=3", "checkpoint.save_interval=2", "training.eval_samples=8"]
    line = errors(run_ranks(resume_rank, 2, str(run_dir), changed))
    assert "training.train_steps 4 -> 3" in line and "checkpoint.allow_config_change=true" in line, line
    opted = run_ranks(resume_rank, 2, str(run_dir), changed + ["checkpoint.allow_config_change=true"])
    assert [len(r["losses"]) for r in opted] == [1, 1]


def test_non_finite_weights_are_never_saved(tmp_path):
    save_dir = str(tmp_path / "ck")
    results = run_ranks(save_non_finite_rank, 2, save_dir, 1)
    line = errors(results)
    assert "refusing to save" in line and "1 NaN/inf values" in line and "rank 1" in line, line
    assert not os.path.exists(os.path.join(save_dir, "latest"))
    assert not [e for e in os.listdir(save_dir) if e.startswith("step_")] if os.path.isdir(save_dir) else True


def test_always_nan_run_stops_after_k_skips_and_single_skips_are_counted(tmp_path):
    extra = ["training.max_consecutive_skips=2", "checkpoint.enabled=false"]
    stop = run_ranks(resume_rank, 2, str(tmp_path / "a"), extra, env={"MRLHF_FAULT_NAN_LOSS": "0:*"})
    line = errors(stop)
    assert "2 optimizer steps in a row" in line and "max_consecutive_skips=2" in line, line
    out = tmp_path / "b"
    run_ranks(resume_rank, 2, str(out), ["training.train_steps=3", "checkpoint.enabled=false", "logging.log_interval=1",
                                         "training.eval_samples=8"],
              env={"MRLHF_FAULT_NAN_LOSS": "1:1"})  # fmt: skip
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["skipped_step"] for r in records] == [0.0, 1.0, 0.0]
    assert [r["skipped_steps_total"] for r in records] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_ppo_checkpoint_covers_every_role_and_a_damaged_role_is_refused_on_resume(tmp_path):
    from trust_runs import ppo_guarded

    out = str(tmp_path / "ppo")
    extra = ["checkpoint.enabled=true", "ppo.ema_decay=0.9"]
    assert "records" in run_ranks(ppo_guarded, 1, out, extra)[0]
    step = os.path.join(out, "checkpoints", "step_00000001")
    files = json.load(open(os.path.join(step, "meta.json")))["files"]
    assert {f.split("/")[0] for f in files} == {"actor", "critic", "ema_actor", "reference", "reward", "ranks"}
    shard = os.path.join(step, "reward", "__0_0.distcp")
    flip_byte(shard)
    # a longer run is a config change resume refuses unless allowed; allowed, the damaged shard is what stops it
    (res,) = run_ranks(ppo_guarded, 1, out, extra + ["training.train_steps=2", "checkpoint.allow_config_change=true"])
    assert f"{shard}: content differs from what was saved" in res["error"], res
