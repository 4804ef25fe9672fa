"""Hugging Face ``config.json`` <-> mrlhf configs.

:class:`HFSpec` is the one description of a model that the weight mapping (``hf.py``) needs, whichever way it runs:
:func:`read_hf_config` builds it from a HF directory (refusing what mrlhf cannot represent, naming the field),
:func:`spec_from_run_config` from an mrlhf checkpoint's config. :func:`run_config_for` and :func:`hf_config_for_export`
turn it into an mrlhf ``RunConfig`` and a ``config.json`` that ``transformers`` loads.

Both config.json generations are read: transformers 4 (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and 5
(``rope_parameters``, ``dtype``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mrlhf.config import RunConfig, config_from_dict
from mrlhf.errors import ConfigError, ConversionError

# architecture -> (model_type family it belongs to, head kind)
ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "score"),
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "score"),
    "MistralForCausalLM": ("mistral", "lm"),
    "MistralForSequenceClassification": ("mistral", "score"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen2ForSequenceClassification": ("qwen2", "score"),
}
_CLASS_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
SCALAR_ROLES = ("reward", "critic")


@dataclass
class HFSpec:
    """Shapes and conventions of one model, in the terms the HF <-> megatron weight mapping needs."""

    model_type: str
    """'gpt2', 'llama', 'mistral' or 'qwen2' (mistral and qwen2 are the llama flavour in mrlhf)."""
    head: str
    """'lm' (``lm_head``), 'score' (``*ForSequenceClassification``) or 'v_head' (TRL value head)."""
    num_layers: int
    hidden: int
    heads: int
    groups: int
    """Key/value heads (== heads without GQA)."""
    ffn: int
    vocab: int
    """Real vocabulary size (rows of the HF embedding)."""
    max_positions: int
    eps: float
    rope_base: int = 10000
    tied: bool = False
    qkv_bias: bool = False
    prefix: str = ""
    """Prefix of backbone keys: 'model.' (llama family), 'transformer.' or '' (bare GPT2Model files)."""
    v_head_key: str = "v_head.summary"
    """Module holding a TRL value head: 'v_head.summary' or 'v_head'."""
    source: str = "config.json"
    """Where the spec came from, for error messages."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The config.json it was read from ({} when built from an mrlhf config)."""
    notes: tuple[str, ...] = ()
    """What reading the config changed that the user should know (e.g. a capped length), one line each."""

    @property
    def flavour(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def architecture(self, scalar: bool) -> str:
        cls = _CLASS_PREFIX[self.model_type]
        if scalar:
            return f"{cls}ForSequenceClassification"
        return f"{cls}LMHeadModel" if self.model_type == "gpt2" else f"{cls}ForCausalLM"


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a readable json file: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a json object, got {type(data).__name__}")
    return data


def read_hf_config(hf_dir: str) -> HFSpec:
    """HFSpec of a HF model directory; a ConversionError naming config.json and the field for anything unsupported."""
    path = os.path.join(hf_dir, "config.json")
    raw = read_json(path)
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: field 'architectures' is {archs!r}; supported: {', '.join(ARCHITECTURES)}")
    model_type, head = ARCHITECTURES[arch]

    def get(key: str) -> Any:
        if raw.get(key) is None:
            raise ConversionError(f"{path}: field '{key}' is missing (needed for {arch})")
        return raw[key]

    def refuse(key: str, value: Any, why: str) -> None:
        raise ConversionError(f"{path}: field '{key}' = {value!r} is not supported: {why}")

    num_labels = raw.get("num_labels") or len(raw.get("id2label") or {0: ""})
    if head == "score" and num_labels != 1:
        refuse("id2label", raw.get("id2label"), f"{num_labels} labels; reward/critic models need num_labels=1")
    if model_type == "gpt2":
        hidden = get("n_embd")
        act = raw.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse("activation_function", act, "mrlhf's gpt2 flavour uses the tanh GELU (gelu_new)")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if raw.get(key, ok) != ok:
                refuse(key, raw[key], f"mrlhf attention needs {key}={ok}")
        return HFSpec(
            model_type=model_type, head=head, num_layers=get("n_layer"), hidden=hidden, heads=get("n_head"),
            groups=get("n_head"), ffn=raw.get("n_inner") or 4 * hidden, vocab=get("vocab_size"),
            max_positions=get("n_positions"), eps=raw.get("layer_norm_epsilon", 1e-5),
            tied=raw.get("tie_word_embeddings", True), qkv_bias=True, prefix="transformer.", source=path, raw=raw,
        )  # fmt: skip

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if raw.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", raw["hidden_act"], "the llama flavour uses SwiGLU with silu")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        refuse("head_dim", head_dim, f"mrlhf needs head_dim = hidden_size / num_attention_heads = {hidden // heads}")
    for key in ("attention_bias", "mlp_bias"):  # llama: attention_bias also puts a bias on o_proj
        if raw.get(key):
            refuse(key, raw[key], "biases on o_proj/MLP are not supported (Qwen2's q/k/v bias is)")
    if model_type == "qwen2":
        if raw.get("use_sliding_window"):
            refuse("use_sliding_window", True, "mrlhf attention is always full (causal)")
        if any(t != "full_attention" for t in raw.get("layer_types") or []):
            refuse("layer_types", raw["layer_types"], "mrlhf attention is always full (causal)")
    max_positions, notes = get("max_position_embeddings"), ()
    window = raw.get("sliding_window") if model_type == "mistral" else None
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            refuse("sliding_window", window, "expected a positive whole number of tokens or null")
        if window < max_positions:
            # mrlhf attention is full (causal): equal to Mistral's up to `window` tokens, different beyond (a window
            # of 12 at length 24 moved HF's logits by up to 7.1). Cap the usable length instead of diverging silently.
            notes = (
                f"{path}: field 'sliding_window' = {window} is below max_position_embeddings = {max_positions}; mrlhf "
                f"attention is full, identical to Mistral's only within the window, so the checkpoint's "
                f"model.max_position_embeddings is capped at {window} (longer sequences are refused, not approximated)",
            )
            max_positions = window
    return HFSpec(
        model_type=model_type, head=head, num_layers=get("num_hidden_layers"), hidden=hidden, heads=heads,
        groups=raw.get("num_key_value_heads") or heads, ffn=get("intermediate_size"), vocab=get("vocab_size"),
        max_positions=max_positions, eps=raw.get("rms_norm_eps", 1e-6),
        rope_base=_rope_base(raw, path), tied=raw.get("tie_word_embeddings", False), qkv_bias=model_type == "qwen2",
        prefix="model.", source=path, raw=raw, notes=notes,
    )  # fmt: skip


def _rope_base(raw: dict[str, Any], path: str) -> int:
    """RoPE base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (5); only unscaled RoPE is supported."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling_key = "rope_parameters" if params else "rope_scaling"
    scaling = params or raw.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise ConversionError(
                f"{path}: field '{scaling_key}' has rope type {kind!r}; only unscaled RoPE is supported "
                f"({scaling_key}: null or rope_type 'default')"
            )
        if isinstance(scaling, dict) and scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConversionError(f"{path}: field '{scaling_key}.partial_rotary_factor' must be 1.0")
    theta = (params or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"{path}: field 'rope_theta' = {theta} must be a whole number")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{path}: field 'partial_rotary_factor' must be 1.0")
    return int(theta)


def check_layout(spec: HFSpec, tp: int, pp: int) -> None:
    """Target layout against the model, with the HF field names in the message (before any process starts)."""
    names = {"gpt2": ("n_head", "n_head", "n_layer", "n_inner")}.get(
        spec.model_type, ("num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size")
    )
    for name, value, size, flag in (
        (names[0], spec.heads, tp, "--tp"),
        (names[1], spec.groups, tp, "--tp"),
        (names[3], spec.ffn, tp, "--tp"),
        (names[2], spec.num_layers, pp, "--pp"),
    ):
        if size < 1 or value % size:
            raise ConversionError(f"{spec.source}: {name}={value} is not divisible by {flag} {size}")


def run_config_for(spec: HFSpec, tp: int, pp: int, precision: str, tokenizer_path: str = "") -> RunConfig:
    """The RunConfig a converted checkpoint records: the model, the layout, the precision and its tokenizer."""
    check_layout(spec, tp, pp)
    seq = min(256, spec.max_positions)
    data = {
        "model": {
            "flavour": spec.flavour,
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden,
            "num_attention_heads": spec.heads,
            "num_query_groups": None if spec.groups == spec.heads else spec.groups,
            "ffn_hidden_size": spec.ffn,
            "vocab_size": spec.vocab,
            "max_position_embeddings": spec.max_positions,
            "rotary_base": spec.rope_base,
            "qkv_bias": spec.qkv_bias,
            "tie_word_embeddings": spec.tied,
            "norm_epsilon": float(spec.eps),
        },
        "parallel": {"tp": tp, "pp": pp},
        "training": {"precision": precision},
        "data": {"tokenizer_path": tokenizer_path, "max_seq_len": seq, "max_prompt_len": min(128, seq)},
    }
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConversionError(f"{spec.source}: cannot be represented in mrlhf: {e}") from None


def spec_from_run_config(cfg: RunConfig, vocab: int, model_type: str | None, head: str) -> HFSpec:
    """HFSpec of an mrlhf model; ``model_type`` None picks gpt2, qwen2 (q/k/v bias) or llama."""
    m = cfg.model
    if model_type is None:
        model_type = "gpt2" if m.flavour == "gpt2" else ("qwen2" if m.has_qkv_bias else "llama")
    if model_type != "qwen2" and m.flavour == "llama" and m.has_qkv_bias:
        model_type = "qwen2"  # only Qwen2 has q/k/v bias without an o_proj bias
    return HFSpec(
        model_type=model_type, head=head, num_layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads,
        groups=m.query_groups, ffn=m.ffn_size, vocab=vocab, max_positions=m.max_position_embeddings,
        eps=m.norm_epsilon, rope_base=m.rotary_base, tied=m.tied, qkv_bias=m.has_qkv_bias,
        prefix="transformer." if model_type == "gpt2" else "model.", source="mrlhf config",
    )  # fmt: skip


def hf_config_for_export(
    spec: HFSpec, scalar: bool, dtype_name: str, original: dict[str, Any] | None, special: dict[str, int | None]
) -> dict[str, Any]:
    """config.json for the exported model. Starts from the original HF config when the checkpoint was converted from
    one (so token ids and unmodelled fields survive), then sets every field the weights depend on."""
    out = dict(original or {})
    out["architectures"] = [spec.architecture(scalar)]
    out["model_type"] = spec.model_type
    if spec.model_type == "gpt2":
        out |= {
            "vocab_size": spec.vocab, "n_positions": spec.max_positions, "n_embd": spec.hidden,
            "n_layer": spec.num_layers, "n_head": spec.heads, "n_inner": spec.ffn, "layer_norm_epsilon": spec.eps,
            "activation_function": out.get("activation_function", "gelu_new"), "tie_word_embeddings": spec.tied,
        }  # fmt: skip
    else:
        out |= {
            "vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": spec.ffn,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.groups, "head_dim": spec.head_dim, "max_position_embeddings": spec.max_positions,
            "rms_norm_eps": spec.eps, "hidden_act": "silu", "tie_word_embeddings": spec.tied,
        }  # fmt: skip
        if spec.model_type == "llama":
            out |= {"attention_bias": False, "mlp_bias": False}
        if spec.model_type == "qwen2":
            out |= {"use_sliding_window": False, "max_window_layers": spec.num_layers}
            out.pop("layer_types", None)
        if isinstance(out.get("rope_parameters"), dict):  # transformers 5 form
            out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": float(spec.rope_base)}
        else:
            out |= {"rope_theta": float(spec.rope_base), "rope_scaling": None}
    for key in ("dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if key in out:
            out[key] = 0.0
    out["dtype" if "torch_dtype" not in out else "torch_dtype"] = dtype_name
    for key, value in special.items():  # the original's token ids win; the tokenizer fills the gaps
        if out.get(key) is None:
            out[key] = value
    if scalar:
        out |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    else:
        for key in ("num_labels", "id2label", "label2id"):
            out.pop(key, None)
    return out
