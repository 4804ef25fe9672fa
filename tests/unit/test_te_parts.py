"""Transformer Engine support that can be checked without TE: the layer switch, the init rule for TE's fused norms
and the key maps between TE and local layer names. What needs TE and a GPU is in scripts/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

from mrlhf.config import load_config
from mrlhf.errors import ConfigError
from mrlhf.models.backbone import init_value, is_norm_param
from mrlhf.models.keymap import PAIRS, convert_name, local_to_te, te_to_local

# names of one llama layer as megatron's local layers and as TE layers name them (global parameter names)
LOCAL = [
    "decoder.layers.3.input_layernorm.weight",
    "decoder.layers.3.self_attention.linear_qkv.weight",
    "decoder.layers.3.self_attention.linear_proj.weight",
    "decoder.layers.3.pre_mlp_layernorm.weight",
    "decoder.layers.3.mlp.linear_fc1.weight",
    "decoder.layers.3.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "embedding.word_embeddings.weight",
]
TE = [
    "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.3.self_attention.linear_qkv.weight",
    "decoder.layers.3.self_attention.linear_proj.weight",
    "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.3.mlp.linear_fc1.weight",
    "decoder.layers.3.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "embedding.word_embeddings.weight",
]


def test_key_maps_both_ways():
    assert [local_to_te(n) for n in LOCAL] == TE
    assert [te_to_local(n) for n in TE] == LOCAL
    # megatron's sharded keys have no layer index; biases (gpt2 LayerNorm) map too
    assert local_to_te("decoder.layers.input_layernorm.bias") == "decoder.layers.self_attention.linear_qkv.layer_norm_bias"
    assert te_to_local("decoder.layers.mlp.linear_fc1.layer_norm_bias") == "decoder.layers.pre_mlp_layernorm.bias"
    assert convert_name(LOCAL[0], "local", "te") == TE[0] and convert_name(TE[3], "te", "local") == LOCAL[3]
    assert convert_name(LOCAL[0], "local", "local") == LOCAL[0]
    assert local_to_te("decoder.layers.3.xinput_layernorm.weight") == "decoder.layers.3.xinput_layernorm.weight"
    with pytest.raises(ValueError, match="unknown layer implementation"):
        convert_name(LOCAL[0], "local", "apex")
    assert len({te for _, te in PAIRS}) == len(PAIRS)


def test_norm_params_initialise_to_one_and_zero_under_both_namings():
    cfg = load_config(None, [])
    for name in ("decoder.layers.0.input_layernorm.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"):  # fmt: skip
        assert is_norm_param(name)
        assert torch.equal(init_value(name, (8,), cfg, 1), torch.ones(8)), name
    for name in ("decoder.layers.0.input_layernorm.bias", "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias"):
        assert is_norm_param(name)
        assert torch.equal(init_value(name, (8,), cfg, 1), torch.zeros(8)), name
    for name in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "embedding.word_embeddings.weight"):  # fmt: skip
        assert not is_norm_param(name)
        w = init_value(name, (64, 8), cfg, 1)
        assert 0.01 < float(w.std()) < 0.03, name  # init_std 0.02, not a norm's constant
    # the TE name of a fused norm draws what the local name draws (a checkpoint-free TE run starts from the same model)
    assert torch.equal(init_value(TE[0], (8,), cfg, 3), init_value(LOCAL[0], (8,), cfg, 3))


def test_transformer_impl_switch():
    from mrlhf.models.spec import describe_backend, resolve_impl

    with pytest.raises(ConfigError, match="model.transformer_impl must be auto, local or te"):
        load_config(None, ["model.transformer_impl=apex"])
    local = load_config(None, ["model.transformer_impl=local"]).model
    assert resolve_impl(local) == "local"
    assert describe_backend(local) == "layers: megatron local linears and norms, mrlhf SDPA core attention"
    auto = load_config(None, []).model
    if not torch.cuda.is_available():  # the CPU machines of CI: auto means local, and says why
        assert resolve_impl(auto) == "local"
        assert "Transformer Engine not used: no CUDA device" in describe_backend(auto)
        with pytest.raises(ConfigError, match=r"model.transformer_impl=te but Transformer Engine is not usable here"):
            resolve_impl(load_config(None, ["model.transformer_impl=te"]).model)


def test_local_spec_uses_mrlhf_core_attention():
    from mrlhf.models.attention import SDPACoreAttention
    from mrlhf.models.spec import get_layer_spec

    for flavour in ("llama", "gpt2"):
        extra = ["model.num_query_groups=null"] if flavour == "gpt2" else []
        spec = get_layer_spec(load_config(None, [f"model.flavour={flavour}", *extra]).model, "local")
        assert spec.submodules.self_attention.submodules.core_attention is SDPACoreAttention
