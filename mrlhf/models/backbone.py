"""The megatron-core GPT backbone: build one pipeline stage's slice, initialise it layout-invariantly, run it.

``build_backbone`` returns megatron-core's ``GPTModel`` for this rank's stage (``pre_process`` on the first stage,
``post_process`` on the last). ``backbone_forward`` runs embedding + this stage's layers (+ final norm on the last
stage) and returns hidden states ``[s, b, h]``; heads (``heads.py``) turn them into log-probs, values or rewards.

Weights are initialised by :func:`init_weights` from the seed and each parameter's *global* name, full tensor
first and then this rank's shard, so every TP/PP layout starts from the same model (megatron's own init draws
from one RNG stream per stage, which differs between layouts).
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state as ps

from mrlhf.config import RunConfig
from mrlhf.models.attention import build_attention_mask
from mrlhf.parallel.compat import building_model


def build_backbone(cfg: RunConfig, vocab_size: int, pre_process: bool, post_process: bool):
    """megatron-core GPTModel for this rank's stage, with the padded vocabulary and our layer spec."""
    from megatron.core.models.gpt import GPTModel

    from mrlhf.models.spec import get_layer_spec, resolve_impl

    m = cfg.model
    tcfg = cfg.to_transformer_config()
    impl = resolve_impl(m)
    with building_model():
        gpt = GPTModel(
            config=tcfg,
            transformer_layer_spec=get_layer_spec(m, impl),
            vocab_size=m.padded_vocab_size(vocab_size),
            max_sequence_length=m.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=m.tied,
            position_embedding_type="rope" if m.flavour == "llama" else "learned_absolute",
            rotary_base=m.rotary_base,
        )
    gpt.real_vocab_size = vocab_size
    gpt.transformer_impl = impl
    return gpt


def global_param_name(gpt, local_name: str) -> str:
    """``decoder.layers.{i}.*`` with this stage's local i -> the layer's global index."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if not match:
        return local_name
    layer = gpt.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def _full_shape(param: torch.Tensor, tp: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def _local_shard(full: torch.Tensor, param: torch.Tensor, name: str, gated: bool, tp: int, tp_rank: int):
    """This TP rank's slice of the canonical full tensor (SwiGLU fc1 keeps [gate_r; up_r] per rank)."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if gated and "linear_fc1" in name:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def is_norm_param(name: str) -> bool:
    """A norm's weight or bias: a norm module's (``input_layernorm.weight``, ``final_layernorm.bias``) or one that
    Transformer Engine fuses into the next linear (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_bias``)."""
    module, _, leaf = name.rpartition(".")
    return leaf.startswith("layer_norm_") or (leaf in ("weight", "bias") and "norm" in module.rsplit(".", 1)[-1])


def init_value(name: str, shape: tuple[int, ...], cfg: RunConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of the parameter with global ``name``: a pure function of (seed, name)."""
    m = cfg.model
    leaf = name.rsplit(".", 1)[-1]
    if is_norm_param(name):  # LayerNorm / RMSNorm: weight 1, bias 0 (also TE's norms fused into a linear)
        return torch.ones(shape) if leaf.endswith("weight") else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = m.init_std
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = m.init_std / math.sqrt(2.0 * m.num_layers)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=gen) * std


def mark_tensor_parallel(gpt) -> None:
    """Tag TP-sharded weights (megatron only tags them when it initialises them itself)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in gpt.modules():
        dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}.get(type(module))
        weight = getattr(module, "weight", None)
        if dim is not None and isinstance(weight, torch.nn.Parameter):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


@torch.no_grad()
def init_weights(gpt, cfg: RunConfig, seed: int) -> None:
    """Initialise every parameter from (seed, global name), identically under any TP/PP layout."""
    mark_tensor_parallel(gpt)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    gated = cfg.model.flavour == "llama"
    for local_name, param in gpt.named_parameters():
        name = global_param_name(gpt, local_name)
        if name == "output_layer.weight" and cfg.model.tied:
            name = "embedding.word_embeddings.weight"  # tied copy on the last stage starts equal to the embedding
        full = init_value(name, _full_shape(param, tp), cfg, seed)
        param.copy_(_local_shard(full, param, name, gated, tp, tp_rank))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only ([b, s]); works for left and right padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone_forward(
    gpt,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    input_tensor: torch.Tensor | None = None,
    rope: bool = True,
) -> torch.Tensor:
    """Run this stage. tokens/position_ids/attention_mask: [b, s]; input_tensor (non-first stages): [s, b, h].

    Returns hidden states [s, b, h] (after the final norm on the last stage). ``rope=False`` leaves q/k unrotated
    (decode steps whose fused cache op applies RoPE itself).
    """
    s = tokens.shape[1]
    mask = build_attention_mask(attention_mask, s)
    if gpt.pre_process:
        hidden = gpt.embedding(input_ids=tokens, position_ids=position_ids)  # [b, s] -> [s, b, h]
    else:
        assert input_tensor is not None, "a non-first stage needs the previous stage's activation"
        gpt.decoder.set_input_tensor(input_tensor)
        hidden = None
    rotary = None
    if rope and getattr(gpt, "rotary_pos_emb", None) is not None:
        table = gpt.rotary_pos_emb(int(position_ids.max()) + 1)  # [max_pos, 1, 1, d]
        rotary = table[position_ids.t()].squeeze(2)  # [s, b, 1, d]: each sequence at its own positions
    return gpt.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
