"""User errors through the real command line: exit code 2, one ``mrlhf: error:`` line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = str(ROOT / "configs" / "sft_tiny.yaml")


def run_sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mrlhf.cli", "sft", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single error line on stderr (asserting exit code 2 and no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mrlhf: error:"), lines[0]
    return lines[0]


def test_unknown_key_in_override() -> None:
    line = one_error_line(run_sft("--config", TINY_YAML, "model.hiden_size=64"))
    assert "model.hiden_size" in line


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n", encoding="utf-8")
    line = one_error_line(run_sft("--config", str(path)))
    assert "model.hiden_size" in line
    assert str(path) in line


def test_impossible_layout() -> None:
    line = one_error_line(run_sft("--config", TINY_YAML, "parallel.tp=3", "model.num_attention_heads=4"))
    assert "num_attention_heads" in line
    assert "parallel.tp" in line


def test_missing_config_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "does_not_exist.yaml")
    line = one_error_line(run_sft("--config", missing))
    assert missing in line


def test_missing_training_data(tmp_path: Path) -> None:
    # gets past config validation; data is checked before any process group starts;
    # output_dir points at tmp_path so nothing can land in the repository's runs/
    line = one_error_line(
        run_sft("--config", TINY_YAML, "data.train_path=/nonexistent.jsonl", f"training.output_dir={tmp_path / 'out'}")
    )
    assert "/nonexistent.jsonl" in line


def test_malformed_override() -> None:
    line = one_error_line(run_sft("--config", TINY_YAML, "optimizer.lr"))
    assert "optimizer.lr" in line


def test_dataset_smaller_than_one_global_batch(tmp_path: Path) -> None:
    line = one_error_line(
        run_sft("--config", TINY_YAML, "training.global_batch_size=4096", "training.micro_batch_size=2",
                f"training.output_dir={tmp_path / 'out'}", "data.cache_dir=null")  # fmt: skip
    )
    assert "sft_train.jsonl" in line and "fewer than one global batch (4096)" in line


def test_bad_record_names_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Hi?", "response": "ok."}\n{"prompt": "  ", "response": "x"}\n', encoding="utf-8")
    line = one_error_line(run_sft("--config", TINY_YAML, f"data.train_path={data}", f"training.output_dir={tmp_path}"))
    assert f"{data}:2" in line and "field 'prompt'" in line


def test_tokenizer_train_vocab_size_out_of_range(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("1 + 1 = 2.\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "mrlhf.cli", "tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "t")]
    proc = subprocess.run([*cmd, "--vocab-size", "5000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = one_error_line(proc)
    assert "--vocab-size 5000 is too large" in line and "supports 266 to" in line, line
    assert not (tmp_path / "t.model").exists()
