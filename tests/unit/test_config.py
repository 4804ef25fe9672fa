"""Run configuration: defaults, YAML loading, dotted overrides, validation errors, round trips."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mrlhf.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from mrlhf.errors import ConfigError, MrlhfError

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "sft_tiny.yaml"


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(overrides: list[str] | None = None, path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---- defaults ----


def test_defaults_build() -> None:
    cfg = RunConfig()
    assert cfg.model.flavour == "llama"
    assert cfg.parallel.tp == 1 and cfg.parallel.pp == 1
    assert cfg.training.precision == "fp32"
    assert load_config() == cfg
    assert load_config(None, []) == cfg


def test_config_error_is_user_error_with_exit_code_2() -> None:
    assert issubclass(ConfigError, MrlhfError)
    assert ConfigError.exit_code == 2


def test_derived_paths() -> None:
    cfg = load_config(None, ["training.output_dir=out"])
    assert cfg.save_dir == os.path.join("out", "checkpoints")
    assert cfg.metrics_file == os.path.join("out", "metrics.jsonl")
    cfg = load_config(None, ["checkpoint.save_dir=/ck", "logging.metrics_file=/m.jsonl"])
    assert cfg.save_dir == "/ck"
    assert cfg.metrics_file == "/m.jsonl"


# ---- YAML files ----


def test_yaml_file_values(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "model:\n  flavour: gpt2\n  num_layers: 4\n  hidden_size: 128\n"
        "optimizer:\n  lr: 2.0e-4\ntraining:\n  seed: 7\n",
    )
    cfg = load_config(path)
    assert cfg.model.flavour == "gpt2"
    assert cfg.model.num_layers == 4
    assert cfg.model.hidden_size == 128
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert cfg.training.seed == 7
    # untouched sections keep their defaults
    assert cfg.scheduler == RunConfig().scheduler


def test_empty_yaml_and_null_section_give_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, "", "empty.yaml")) == RunConfig()
    assert load_config(write_yaml(tmp_path, "model:\n", "null.yaml")) == RunConfig()


def test_relative_data_paths_resolved_against_yaml_dir(tmp_path: Path) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write_yaml(
        sub,
        "data:\n  train_path: ./train.jsonl\n  eval_path: ../eval.jsonl\n  tokenizer_path: /abs/tok.model\n",
    )
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # resolution must not depend on the working directory
        cfg = load_config(path)
    finally:
        os.chdir(cwd)
    assert cfg.data.train_path == str(sub / "train.jsonl")
    assert cfg.data.eval_path == str(tmp_path / "eval.jsonl")
    assert cfg.data.tokenizer_path == "/abs/tok.model"


def test_override_paths_are_not_rebased_on_the_yaml_dir(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "data:\n  train_path: ./a.jsonl\n")
    cfg = load_config(path, ["data.eval_path=./b.jsonl"])
    assert cfg.data.train_path == str(tmp_path / "a.jsonl")
    assert cfg.data.eval_path == "./b.jsonl"


def test_sft_tiny_loads_and_data_paths_exist() -> None:
    cfg = load_config(str(TINY_YAML))
    assert cfg.model.flavour == "llama"
    for p in (cfg.data.train_path, cfg.data.eval_path, cfg.data.tokenizer_path):
        assert p is not None and os.path.isabs(p), p
        assert os.path.isfile(p), p
    assert cfg.validate_world(1) == 1


# ---- overrides ----


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "optimizer.lr=1.0e-4",
            "parallel.tp=2",
            "model.qkv_bias=true",
            "data.eval_path=null",
            "training.precision=bf16",
        ],
    )
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert isinstance(cfg.optimizer.lr, float)
    assert cfg.parallel.tp == 2 and isinstance(cfg.parallel.tp, int)
    assert cfg.model.qkv_bias is True
    assert cfg.model.has_qkv_bias is True
    assert cfg.data.eval_path is None
    assert cfg.training.precision == "bf16"


def test_override_null_clears_yaml_value(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "data:\n  eval_path: /x/eval.jsonl\n")
    assert load_config(path).data.eval_path == "/x/eval.jsonl"
    assert load_config(path, ["data.eval_path=null"]).data.eval_path is None


def test_override_beats_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "training:\n  seed: 1\n  train_steps: 5\n")
    cfg = load_config(path, ["training.seed=99"])
    assert cfg.training.seed == 99
    assert cfg.training.train_steps == 5


def test_override_value_may_contain_equals_and_empty_string() -> None:
    data = apply_overrides({}, ["data.train_path=a=b.jsonl", "data.tokenizer_path="])
    assert data == {"data": {"train_path": "a=b.jsonl", "tokenizer_path": ""}}


def test_override_without_equals() -> None:
    msg = config_error(["optimizer.lr"])
    assert "optimizer.lr" in msg


def test_override_into_a_scalar_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  hidden_size: 64\n")
    msg = config_error(["model.hidden_size.x=1"], path)
    assert "hidden_size" in msg


# ---- errors ----


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = config_error(path=write_yaml(tmp_path, "modle:\n  num_layers: 2\n"))
    assert "'modle'" in msg
    assert "unknown key" in msg


def test_unknown_nested_key_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  hiden_size: 64\n")
    msg = config_error(path=path)
    assert "model.hiden_size" in msg
    assert path in msg


def test_unknown_nested_key_override() -> None:
    msg = config_error(["model.hiden_size=64"])
    assert "model.hiden_size" in msg
    # the message lists the valid keys of that section
    assert "hidden_size" in msg.replace("hiden_size", "")


def test_section_must_be_mapping(tmp_path: Path) -> None:
    msg = config_error(path=write_yaml(tmp_path, "model: 3\n"))
    assert "'model'" in msg and "mapping" in msg


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    msg = config_error(path=write_yaml(tmp_path, "- 1\n- 2\n"))
    assert "mapping" in msg


def test_wrong_type_string_for_optional_int() -> None:
    msg = config_error(["model.num_query_groups=two"])
    assert "model.num_query_groups" in msg
    assert "int" in msg


def test_wrong_type_string_for_optional_bool() -> None:
    msg = config_error(["model.tie_word_embeddings=maybe"])
    assert "model.tie_word_embeddings" in msg
    assert "bool" in msg


def test_null_for_non_optional() -> None:
    msg = config_error(["model.hidden_size=null"])
    assert "model.hidden_size" in msg
    assert "null" in msg


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  num_layers: 2\n   hidden_size: 3\n")
    msg = config_error(path=path)
    assert msg.startswith(f"{path}:3:"), msg
    assert "invalid YAML" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    msg = config_error(path=path)
    assert path in msg


def test_heads_not_divisible_by_tp() -> None:
    msg = config_error(["model.num_attention_heads=4", "parallel.tp=3"])
    assert "num_attention_heads" in msg and "parallel.tp" in msg


def test_query_groups_not_divisible_by_tp() -> None:
    msg = config_error(["model.num_attention_heads=4", "model.num_query_groups=2", "parallel.tp=4"])
    assert "num_query_groups" in msg and "parallel.tp" in msg


def test_heads_not_divisible_by_query_groups() -> None:
    msg = config_error(["model.num_attention_heads=4", "model.num_query_groups=3", "model.hidden_size=48"])
    assert "num_query_groups" in msg


def test_layers_not_splittable_by_pp() -> None:
    msg = config_error(["model.num_layers=3", "parallel.pp=2"])
    assert "parallel.pp=2" in msg and "num_layers=3" in msg


def test_uneven_stages_accepted() -> None:
    cfg = load_config(None, ["model.num_layers=3", "parallel.pp=2", "parallel.first_stage_layers=1"])
    assert cfg.parallel.first_stage_layers == 1


def test_flavour_gpt2_with_gqa_rejected() -> None:
    msg = config_error(["model.flavour=gpt2", "model.num_query_groups=2"])
    assert "num_query_groups" in msg


def test_invalid_flavour() -> None:
    assert "model.flavour" in config_error(["model.flavour=bert"])


def test_precision_invalid() -> None:
    msg = config_error(["training.precision=fp16"])
    assert "training.precision" in msg and "fp16" in msg


def test_global_batch_not_multiple_of_micro_batch() -> None:
    # checked with the world size (PPO counts prompts in global_batch_size and sequences in micro_batch_size, so the
    # rule differs by stage: see validate_ppo_batches)
    cfg = load_config(None, ["training.global_batch_size=6", "training.micro_batch_size=4"])
    with pytest.raises(ConfigError) as e:
        cfg.validate_world(1)
    assert "global_batch_size" in str(e.value) and "micro_batch_size" in str(e.value)


def test_max_seq_len_beyond_positions() -> None:
    msg = config_error(["data.max_seq_len=512", "model.max_position_embeddings=256"])
    assert "data.max_seq_len" in msg


def test_other_value_checks() -> None:
    assert "optimizer" in config_error(["optimizer.min_lr=1.0", "optimizer.lr=0.1"])
    assert "scheduler.decay" in config_error(["scheduler.decay=step"])
    assert "parallel.backend" in config_error(["parallel.backend=mpi"])
    assert "data.max_seq_len" in config_error(["data.max_seq_len=1"])
    assert "parallel.tp" in config_error(["parallel.tp=0"])


# ---- world size ----


def test_validate_world_returns_dp() -> None:
    cfg = load_config(
        None,
        [
            "parallel.tp=2",
            "parallel.pp=2",
            "model.num_layers=4",
            "training.global_batch_size=8",
            "training.micro_batch_size=2",
        ],
    )
    assert cfg.validate_world(4) == 1
    assert cfg.validate_world(8) == 2
    assert cfg.validate_world(16) == 4


def test_validate_world_global_batch_vs_dp_micro() -> None:
    cfg = load_config(None, ["training.global_batch_size=8", "training.micro_batch_size=4"])
    assert cfg.validate_world(2) == 2
    with pytest.raises(ConfigError) as info:
        cfg.validate_world(4)  # dp=4 x micro=4 = 16 does not divide 8
    msg = str(info.value)
    assert "global_batch_size" in msg and "dp (4)" in msg and "micro_batch_size" in msg


def test_validate_world_not_divisible_by_tp_pp() -> None:
    cfg = load_config(None, ["parallel.tp=2"])
    with pytest.raises(ConfigError) as info:
        cfg.validate_world(3)
    assert "world size 3" in str(info.value)
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError):
        cfg.validate_world(6)


# ---- round trips ----


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "model.flavour=gpt2",
            "parallel.tp=2",
            "optimizer.lr=0.0005",
            "data.eval_path=/e.jsonl",
            "model.qkv_bias=true",
        ],
    ],
)
def test_dict_round_trip(overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_yaml_round_trip_defaults(tmp_path: Path) -> None:
    cfg = RunConfig()
    path = write_yaml(tmp_path, cfg.to_yaml())
    assert load_config(path) == cfg


def test_yaml_round_trip_sft_tiny(tmp_path: Path) -> None:
    cfg = load_config(str(TINY_YAML))
    assert config_from_dict(cfg.to_dict()) == cfg
    path = write_yaml(tmp_path, cfg.to_yaml())
    assert load_config(path) == cfg


# ---- derived model properties ----


def test_ffn_size() -> None:
    assert ModelConfig(flavour="gpt2", hidden_size=64).ffn_size == 256
    assert ModelConfig(flavour="gpt2", hidden_size=96, num_attention_heads=4).ffn_size == 384
    # llama: 8/3*h rounded up to a multiple of 256
    assert ModelConfig(flavour="llama", hidden_size=64).ffn_size == 256
    assert ModelConfig(flavour="llama", hidden_size=4096, num_attention_heads=32).ffn_size == 11008
    assert ModelConfig(flavour="llama", hidden_size=64, ffn_hidden_size=176).ffn_size == 176


def test_flavour_defaults_for_tying_and_qkv_bias() -> None:
    gpt2 = ModelConfig(flavour="gpt2")
    llama = ModelConfig(flavour="llama")
    assert gpt2.tied is True and gpt2.has_qkv_bias is True
    assert llama.tied is False and llama.has_qkv_bias is False
    assert ModelConfig(flavour="llama", qkv_bias=True).has_qkv_bias is True
    assert ModelConfig(flavour="llama", tie_word_embeddings=True).tied is True
    assert ModelConfig(flavour="gpt2", tie_word_embeddings=False).tied is False
    assert ModelConfig(flavour="gpt2", qkv_bias=False).has_qkv_bias is False


def test_query_groups_default() -> None:
    assert ModelConfig(num_attention_heads=4).query_groups == 4
    assert ModelConfig(num_attention_heads=4, num_query_groups=2).query_groups == 2


def test_padded_vocab_size() -> None:
    m = ModelConfig(make_vocab_size_divisible_by=128)
    assert m.padded_vocab_size(300) == 384
    assert m.padded_vocab_size(384) == 384
    assert m.padded_vocab_size(1) == 128
    assert ModelConfig(make_vocab_size_divisible_by=8).padded_vocab_size(300) == 304


def test_vocab_divisor_must_split_over_tp() -> None:
    msg = config_error(["model.make_vocab_size_divisible_by=6", "parallel.tp=4", "model.num_query_groups=4"])
    assert "make_vocab_size_divisible_by" in msg


def test_data_config_defaults() -> None:
    d = DataConfig()
    assert d.eval_path is None and d.max_seq_len == 256


# ---- megatron-core TransformerConfig (imports megatron) ----


def test_to_transformer_config() -> None:
    llama = load_config(None, ["parallel.tp=2", "parallel.pp=2", "model.num_layers=4", "model.num_query_groups=2"])
    t = llama.to_transformer_config()
    assert t.normalization == "RMSNorm"
    assert t.gated_linear_unit is True
    assert t.add_bias_linear is False
    assert t.add_qkv_bias is False
    assert t.tensor_model_parallel_size == 2
    assert t.pipeline_model_parallel_size == 2
    assert t.num_layers == 4
    assert t.num_query_groups == 2
    assert t.ffn_hidden_size == llama.model.ffn_size

    gpt2 = load_config(None, ["model.flavour=gpt2"]).to_transformer_config()
    assert gpt2.normalization == "LayerNorm"
    assert gpt2.add_bias_linear is True
    assert gpt2.gated_linear_unit is False
    assert gpt2.add_qkv_bias is True
    assert gpt2.ffn_hidden_size == 4 * 64
    assert gpt2.tensor_model_parallel_size == 1 and gpt2.pipeline_model_parallel_size == 1


def test_message_names_source(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "training:\n  precision: fp8\n")
    msg = config_error(path=path)
    assert re.search(re.escape(path) + r".*training\.precision", msg)


# ---- config holds data only: nothing below it is imported from it ----

UPWARD = ("mrlhf.generation", "mrlhf.models", "mrlhf.ops", "mrlhf.trainers", "mrlhf.rl", "mrlhf.serving",
          "mrlhf.data", "mrlhf.convert", "mrlhf.cli", "mrlhf.checkpoint")  # fmt: skip


def test_config_imports_nothing_that_builds_on_it() -> None:
    """Every import statement of mrlhf/config.py, function-local ones included (a lazy import is still a cycle)."""
    import ast

    tree = ast.parse((ROOT / "mrlhf" / "config.py").read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            imported += [base] + [f"{base}.{a.name}" for a in node.names]
    bad = sorted({m for m in imported if m.startswith(".") or m.startswith(UPWARD) or m in ("mrlhf", "mrlhf.*")})
    assert not bad, f"mrlhf/config.py imports {bad}: engine objects belong with the code that uses them"


def test_engine_objects_built_outside_config() -> None:
    from mrlhf.activations import gelu_tanh
    from mrlhf.generation.generate import GenerationConfig

    cfg = load_config(None, ["model.flavour=gpt2", "generation.temperature=0.5", "generation.top_k=7",
                             "generation.top_p=0.9", "generation.seed=3", "generation.max_new_tokens=5",
                             "generation.stop_strings=[END]", "generation.num_slots=2"])  # fmt: skip
    gen = GenerationConfig.from_section(cfg.generation, eos_id=2)
    assert (gen.max_new_tokens, gen.stop_token_ids, gen.stop_strings, gen.num_slots) == (5, (2,), ("END",), 2)
    s = gen.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.5, 7, 0.9, 3)
    assert gen.micro_batch_size == cfg.generation.micro_batch_size
    # the decode path recognises GPT-2's GELU by identity (to fuse it into decode_linear)
    assert cfg.to_transformer_config().activation_func is gelu_tanh
    x = __import__("torch").linspace(-3, 3, 7)
    assert float((gelu_tanh(x) - 0.5 * x * (1 + (0.7978845608 * (x + 0.044715 * x**3)).tanh())).abs().max()) < 1e-6
