"""Weight name and layout mapping between mrlhf (megatron-core GPTModel) and HF transformers, on full tensors.

The mapping works on *full* (TP-unsharded, all layers) state dicts keyed by global megatron names, as
``full_state_dict`` produces at TP1PP1. Megatron's fused QKV groups rows per query group -- [q heads of group g,
k_g, v_g] -- while HF keeps separate (or [q; k; v]-concatenated) projections; SwiGLU's fc1 is [gate; up].
"""

from __future__ import annotations

import torch


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Global-name -> tensor of a TP1PP1 RoleModel's backbone (and head)."""
    from megatron.core import parallel_state as ps

    from mrlhf.models.backbone import global_param_name

    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            out[global_param_name(model.backbone, name.removeprefix("backbone."))] = p.detach()
        else:
            out[name] = p.detach()
    return out


def split_qkv(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused QKV ([groups * (heads/groups + 2) * head_dim, ...]) -> q, k, v in HF row order."""
    per = heads // groups
    w = w.reshape(groups, per + 2, head_dim, *w.shape[1:])
    q = w[:, :per].reshape(heads * head_dim, *w.shape[3:])
    k = w[:, per].reshape(groups * head_dim, *w.shape[3:])
    v = w[:, per + 1].reshape(groups * head_dim, *w.shape[3:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    per = heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per, head_dim, *rest)
    k = k.reshape(groups, 1, head_dim, *rest)
    v = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * head_dim, *rest)


def to_hf_gpt2(sd: dict[str, torch.Tensor], cfg, vocab_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(GPT2Config kwargs, GPT2LMHeadModel state dict). HF Conv1D weights are [in, out]: transposed."""
    m = cfg.model
    h, heads, hd = m.hidden_size, m.num_attention_heads, m.hidden_size // m.num_attention_heads
    out = {
        "transformer.wte.weight": sd["embedding.word_embeddings.weight"][:vocab_size],
        "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        q, k, v = split_qkv(sd[src + "self_attention.linear_qkv.weight"], heads, heads, hd)
        qb, kb, vb = split_qkv(sd[src + "self_attention.linear_qkv.bias"], heads, heads, hd)
        out |= {
            dst + "ln_1.weight": sd[src + "input_layernorm.weight"],
            dst + "ln_1.bias": sd[src + "input_layernorm.bias"],
            dst + "attn.c_attn.weight": torch.cat([q, k, v]).t(),
            dst + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            dst + "attn.c_proj.weight": sd[src + "self_attention.linear_proj.weight"].t(),
            dst + "attn.c_proj.bias": sd[src + "self_attention.linear_proj.bias"],
            dst + "ln_2.weight": sd[src + "pre_mlp_layernorm.weight"],
            dst + "ln_2.bias": sd[src + "pre_mlp_layernorm.bias"],
            dst + "mlp.c_fc.weight": sd[src + "mlp.linear_fc1.weight"].t(),
            dst + "mlp.c_fc.bias": sd[src + "mlp.linear_fc1.bias"],
            dst + "mlp.c_proj.weight": sd[src + "mlp.linear_fc2.weight"].t(),
            dst + "mlp.c_proj.bias": sd[src + "mlp.linear_fc2.bias"],
        }
    out["lm_head.weight"] = out["transformer.wte.weight"]
    config = {
        "vocab_size": vocab_size,
        "n_positions": m.max_position_embeddings,
        "n_embd": h,
        "n_layer": m.num_layers,
        "n_head": heads,
        "n_inner": m.ffn_size,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": m.norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }
    return config, {k: v.contiguous() for k, v in out.items()}


def to_hf_llama(sd: dict[str, torch.Tensor], cfg, vocab_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LlamaConfig / Qwen2Config kwargs, *ForCausalLM state dict)."""
    m = cfg.model
    heads, groups, hd = m.num_attention_heads, m.query_groups, m.hidden_size // m.num_attention_heads
    out = {
        "model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
        "lm_head.weight": sd["embedding.word_embeddings.weight" if m.tied else "output_layer.weight"][:vocab_size],
    }
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(sd[src + "self_attention.linear_qkv.weight"], heads, groups, hd)
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out |= {
            dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "pre_mlp_layernorm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": sd[src + "mlp.linear_fc2.weight"],
        }
        if m.has_qkv_bias:
            qb, kb, vb = split_qkv(sd[src + "self_attention.linear_qkv.bias"], heads, groups, hd)
            out |= {dst + "self_attn.q_proj.bias": qb, dst + "self_attn.k_proj.bias": kb, dst + "self_attn.v_proj.bias": vb}
    config = {
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "tie_word_embeddings": m.tied,
        "attention_bias": m.has_qkv_bias,
        "hidden_act": "silu",
    }
    return config, {k: v.contiguous() for k, v in out.items()}
