"""HF <-> mrlhf conversion from one process (the library forks its own ranks; this process joins no group).

Round trips are bit-exact (keys, dtypes, values) for every architecture, a reward model, bf16, sharded and .bin
inputs; bad inputs fail with a message naming the file or field and leave no output behind; import, export and reshard
stream (peak memory does not grow with the number of layers); the mapping's TP slices equal megatron's sharding.
"""

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mrlhf.convert import hf as mapping
from mrlhf.convert.export_hf import convert_mrlhf_to_hf
from mrlhf.convert.hf_config import read_hf_config
from mrlhf.convert.import_hf import convert_hf_to_mrlhf
from mrlhf.convert.reshard import inspect_checkpoint
from mrlhf.convert.tiny import tiny_hf_model, write_random_hf
from mrlhf.convert.weights import WeightReader, parse_size
from mrlhf.errors import ConversionError
from mrlhf.models.backbone import _local_shard

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "tests" / "fixtures" / "hf_tokenizer")


def hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory (single file or index)."""
    reader = WeightReader.open(path)
    return {k: reader.read(k) for k in reader.files}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "kind,tp,pp",
    [("gpt2", 2, 2), ("llama", 2, 2), ("llama_tied", 1, 2), ("qwen2", 2, 1), ("mistral", 1, 1), ("llama_rm", 2, 2)],
)
def test_round_trip_is_bitwise(kind, tp, pp, tmp_path):
    hf = tiny_hf_model(kind, str(tmp_path / "hf"), tokenizer_dir=TOKENIZER)
    summary = convert_hf_to_mrlhf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=tp, pp=pp)
    assert summary["role"] == ("reward" if kind.endswith("_rm") else "actor")
    assert summary["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    convert_mrlhf_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert_same_tensors(hf_tensors(str(tmp_path / "hf")), hf_tensors(str(tmp_path / "back")))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == hf.config.architectures
    back = (
        transformers.AutoModelForSequenceClassification if kind.endswith("_rm") else transformers.AutoModelForCausalLM
    )
    loaded = back.from_pretrained(str(tmp_path / "back")).eval()
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "ckpt" / "step_00000000" / "meta.json").read_text())
    assert meta["converted_from"]["architecture"] == hf.config.architectures[0]
    assert meta["tokenizer"]["hash"] == meta["tokenizer_hash"] != ""


def test_bf16_sharded_input_and_output_round_trip(tmp_path):
    model = tiny_hf_model("llama", str(tmp_path / "fp32"))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    summary = convert_hf_to_mrlhf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2, pp=2)
    assert summary["precision"] == "bf16"  # auto keeps bf16
    files = convert_mrlhf_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), max_shard_size="60KB")["files"]
    assert len(files["actor"]) > 2 and "model.safetensors.index.json" in files["actor"]
    assert_same_tensors(hf_tensors(str(tmp_path / "hf")), hf_tensors(str(tmp_path / "back")))
    report = inspect_checkpoint(str(tmp_path / "ckpt"))
    assert "tp=2 pp=2" in report and "bfloat16" in report and "LlamaForCausalLM" in report
    listed = len(json.loads(open(glob.glob(str(tmp_path / "ckpt" / "step_*" / "meta.json"))[0]).read())["files"])
    assert f"integrity    {listed} files," in report and "sha256 verified" in report, report


def test_pytorch_bin_input(tmp_path):
    tiny_hf_model("gpt2", str(tmp_path / "src"))
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save(load_file(str(tmp_path / "src" / "model.safetensors")), str(tmp_path / "hf" / "pytorch_model.bin"))
    convert_hf_to_mrlhf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2)
    convert_mrlhf_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert_same_tensors(hf_tensors(str(tmp_path / "src")), hf_tensors(str(tmp_path / "back")))


def test_value_head_and_nonzero_head_bias(tmp_path):
    """A TRL value head (v_head.summary.*) converts as a critic; HF's score has no bias, so a nonzero one needs
    --drop-head-bias to export."""
    tiny_hf_model("llama", str(tmp_path / "hf"), layers=2)
    path = str(tmp_path / "hf" / "model.safetensors")
    sd = load_file(path) | {"v_head.summary.weight": torch.randn(1, 64), "v_head.summary.bias": torch.tensor([0.5])}
    save_file(sd, path, metadata={"format": "pt"})
    assert convert_hf_to_mrlhf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))["role"] == "critic"
    with pytest.raises(ConversionError, match="head.linear.bias.*--drop-head-bias"):
        convert_mrlhf_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
    convert_mrlhf_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), drop_head_bias=True)
    out = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert torch.equal(out["score.weight"], sd["v_head.summary.weight"]) and "lm_head.weight" not in out
    assert type(transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "back"))).__name__ == (
        "LlamaForSequenceClassification"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear message naming the file or field, and nothing left behind


def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (hf / "config.json").write_text(json.dumps(config))


def _edit_weights(hf: Path, fn) -> None:
    path = str(hf / "model.safetensors")
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


class Payload:
    """A pickle that runs code when loaded: creates a marker file."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _evil_bin(hf: Path) -> None:
    Payload.marker = str(hf / "PWNED")
    os.remove(hf / "model.safetensors")
    torch.save({"model.embed_tokens.weight": torch.zeros(300, 64), "x": Payload()}, str(hf / "pytorch_model.bin"))


L0 = "model.layers.0."
BAD = {
    "architecture": (
        lambda hf: _edit_config(hf, architectures=["BertForMaskedLM"]),
        {},
        ["config.json", "'architectures'"],
    ),
    "heads_tp": (None, {"tp": 3}, ["config.json", "num_attention_heads=4", "--tp 3"]),
    "kv_heads_tp": (None, {"tp": 4}, ["config.json", "num_key_value_heads=2", "--tp 4"]),
    "layers_pp": (None, {"pp": 3}, ["config.json", "num_hidden_layers=4", "--pp 3"]),
    "missing_key": (
        lambda hf: _edit_weights(hf, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}),
        {},
        ["model.safetensors", "missing", "model.layers.1.mlp.up_proj.weight"],
    ),
    "extra_key": (
        lambda hf: _edit_weights(hf, lambda sd: sd | {L0 + "mlp.extra.weight": torch.zeros(2)}),
        {},
        ["model.safetensors", "unexpected", L0 + "mlp.extra.weight"],
    ),
    "shape": (
        lambda hf: _edit_weights(hf, lambda sd: sd | {L0 + "self_attn.k_proj.weight": torch.zeros(64, 64)}),
        {},
        ["model.safetensors", L0 + "self_attn.k_proj.weight", "[64, 64]", "[32, 64]"],
    ),
    "truncated": (
        lambda hf: os.truncate(hf / "model.safetensors", os.path.getsize(hf / "model.safetensors") - 100),
        {},
        ["model.safetensors", "truncated"],
    ),
    "pickle_payload": (_evil_bin, {}, ["pytorch_model.bin", "refused"]),
    "rope_scaling": (
        lambda hf: _edit_config(hf, rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        {},
        ["config.json", "'rope_scaling'", "llama3"],
    ),
    "rope_parameters": (
        lambda hf: _edit_config(hf, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        {},
        ["config.json", "'rope_parameters'", "yarn"],
    ),
    "hidden_act": (lambda hf: _edit_config(hf, hidden_act="gelu"), {}, ["config.json", "'hidden_act'"]),
    "seqcls_as_actor": (
        lambda hf: _edit_config(hf, architectures=["LlamaForSequenceClassification"]),
        {"role": "actor"},
        ["config.json", "no LM head"],
    ),
}


def _mistral_dir(tmp_path: Path, **changes) -> str:
    """A Mistral config.json alone (reading the config needs no weights)."""
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
    }  # fmt: skip
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(config | changes))
    return str(hf)


def test_mistral_sliding_window_caps_the_usable_length(tmp_path):
    """mrlhf attention is full: equal to Mistral's within the window, not beyond, so the length is capped there."""
    from mrlhf.config import config_from_dict
    from mrlhf.convert.hf_config import run_config_for
    from mrlhf.errors import ConfigError

    spec = read_hf_config(_mistral_dir(tmp_path, sliding_window=12))
    assert spec.max_positions == 12
    (note,) = spec.notes
    assert "config.json" in note and "'sliding_window' = 12" in note and "capped at 12" in note
    cfg = run_config_for(spec, 1, 1, "fp32")
    assert cfg.model.max_position_embeddings == 12 and cfg.data.max_seq_len <= 12
    data = cfg.to_dict()
    data["data"]["max_seq_len"] = 24
    with pytest.raises(ConfigError, match=r"data.max_seq_len \(24\) exceeds model.max_position_embeddings \(12\)"):
        config_from_dict(data)
    # a window that covers every position (Mistral v0.1: 4096 of 32768 is capped; here 64 of 64 is not) or none
    for window in (64, 4096, None):
        spec = read_hf_config(_mistral_dir(tmp_path, sliding_window=window))
        assert spec.max_positions == 64 and spec.notes == ()
    for bad in (0, "12", 1.5):
        with pytest.raises(ConversionError, match="'sliding_window'"):
            read_hf_config(_mistral_dir(tmp_path, sliding_window=bad))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_cleanly(case, tmp_path):
    mutate, kwargs, words = BAD[case]
    hf = tmp_path / "hf"
    tiny_hf_model("llama", str(hf))
    if mutate:
        mutate(hf)
    with pytest.raises(ConversionError) as err:
        convert_hf_to_mrlhf(str(hf), str(tmp_path / "out"), **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, no temp directory
    assert not (hf / "PWNED").exists()


def test_failure_inside_the_ranks_leaves_nothing(tmp_path, monkeypatch):
    """A rank that fails after writing part of the checkpoint: the whole output disappears (forked ranks inherit
    the patched save)."""
    import mrlhf.convert.import_hf as import_hf

    def half_save(save_dir, *args, **kwargs):
        os.makedirs(os.path.join(save_dir, "step_00000000", "actor"), exist_ok=True)
        raise ConversionError("disk full (simulated)")

    monkeypatch.setattr(import_hf, "save_checkpoint", half_save)
    tiny_hf_model("llama", str(tmp_path / "hf"), layers=2)
    with pytest.raises(ConversionError, match="simulated"):
        convert_hf_to_mrlhf(str(tmp_path / "hf"), str(tmp_path / "deep" / "out"), tp=2)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # created parents are removed too


def test_tool_exit_code_2_with_one_line(tmp_path):
    tiny_hf_model("llama", str(tmp_path / "hf"), layers=2)
    cmd = [sys.executable, str(ROOT / "tools" / "convert_hf_to_mrlhf.py"), "--hf", str(tmp_path / "hf")]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "out"), "--tp", "3"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("convert_hf_to_mrlhf: error:")
    assert "num_attention_heads=4 is not divisible by --tp 3" in res.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Streaming: a conversion's peak memory does not grow with the model (benchmarks/conversion_memory.py prints it)


def peak_rss_of(commands: list[list[str]]) -> list[int]:
    """Peak RSS in bytes of each command (and every process it starts), run side by side. A fresh interpreter per
    command measures its children with getrusage, so nothing else counts."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", probe, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in commands
    ]
    peaks = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        peaks.append(int(stdout.strip().splitlines()[-1]) * 1024)
    return peaks


def test_peak_rss_does_not_grow_with_the_model(tmp_path, budget=0.25):
    """Import, export and reshard of a 16-layer LLaMA peak within a quarter of the added weights of the 8-layer one's
    peak (measured: +0 MiB of +128 MiB at hidden 512). A tool that held the model -- as the non-streaming version
    did, and as transformers' load + save_pretrained does -- grows by at least the weights added (ratio >= 1)."""
    layers = (8, 16)
    sizes = {n: 4 * write_random_hf(str(tmp_path / f"hf{n}"), "llama", n, hidden=384) for n in layers}
    py, tools = sys.executable, ROOT / "tools"
    jobs = {
        "import": lambda n: [py, str(tools / "convert_hf_to_mrlhf.py"), "--hf", str(tmp_path / f"hf{n}"),
                             "--out", str(tmp_path / f"ck{n}")],
        "export": lambda n: [py, str(tools / "convert_mrlhf_to_hf.py"), "--ckpt", str(tmp_path / f"ck{n}"),
                             "--out", str(tmp_path / f"back{n}")],
        "reshard": lambda n: [py, str(tools / "reshard.py"), "--ckpt", str(tmp_path / f"ck{n}"),
                              "--out", str(tmp_path / f"rs{n}"), "--tp", "2", "--pp", "2"],
    }  # fmt: skip
    t0 = time.perf_counter()
    added = sizes[16] - sizes[8]
    for tool, cmd in jobs.items():  # in order: export and reshard read what import wrote
        peaks = dict(zip(layers, peak_rss_of([cmd(n) for n in layers])))
        grew = peaks[16] - peaks[8]
        print(f"\n{tool}: weights {sizes[8] / 2**20:.0f} -> {sizes[16] / 2**20:.0f} MiB, peak RSS "
              f"{peaks[8] / 2**20:.0f} -> {peaks[16] / 2**20:.0f} MiB ({grew / added:+.2f}x of the weights added) "
              f"[{time.perf_counter() - t0:.1f} s]")  # fmt: skip
        assert grew < budget * added, (tool, grew, added)
    # and what was written is the model: the 16-layer export equals its source, the reshard holds every layer
    assert_same_tensors(hf_tensors(str(tmp_path / "hf16")), hf_tensors(str(tmp_path / "back16")))
    assert "[16, " in inspect_checkpoint(str(tmp_path / "rs16"))


# ----------------------------------------------------------------------------------------------------------------------
# The mapping itself, without processes


class DictReader:
    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        t = self.sd[key]
        return t if dim is None else t.narrow(dim, start, stop - start)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_tp_slices_equal_megatron_sharding_and_export_inverts_import(kind, tmp_path):
    tiny_hf_model(kind, str(tmp_path / "hf"), layers=2)
    spec = read_hf_config(str(tmp_path / "hf"))
    hf = DictReader(load_file(str(tmp_path / "hf" / "model.safetensors")))
    table = mapping.recipes(spec, scalar=False)
    padded = 384
    full = {name: mapping.local_shard(r, spec, hf, 1, 0, padded) for name, r in table.items()}
    if spec.tied:
        del full["output_layer.weight"]  # at TP1PP1 the tied LM head is the embedding itself
    assert_same_tensors(mapping.to_hf_state_dict(full, spec, scalar=False), hf.sd)
    for name, tensor in full.items():
        recipe = table[name]
        stub = torch.empty(0)
        stub.tensor_model_parallel, stub.partition_dim = recipe.split is not None, recipe.split
        for rank in range(2):
            want = _local_shard(tensor, stub, name, spec.flavour == "llama", 2, rank)
            assert torch.equal(mapping.local_shard(recipe, spec, hf, 2, rank, padded), want), (name, rank)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("500") == 500
    with pytest.raises(ConversionError, match="max-shard-size"):
        parse_size("lots")


def test_truncated_file_is_named_by_the_reader(tmp_path):
    save_file({"a": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["a"]
    os.truncate(tmp_path / "model.safetensors", 40)
    with pytest.raises(ConversionError, match="model.safetensors.*truncated"):
        WeightReader.open(str(tmp_path))
