"""Tiny random HF models and hand-written weight files, for the conversion tests and for smoke-checking a setup.

``tiny_hf_model`` needs ``transformers`` (a test dependency, imported here only); ``write_random_hf`` needs only
safetensors and writes one shard per layer, so a large model never has to exist in memory at once.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

KINDS = ("gpt2", "llama", "llama_tied", "qwen2", "mistral", "llama_rm", "qwen2_rm", "gpt2_rm")


def tiny_hf_model(kind: str, path: str, layers: int = 4, seed: int = 0, tokenizer_dir: str | None = None, **config):
    """A random ``transformers`` model of ``kind`` saved to ``path`` (hidden 64, 4 heads, GQA with 2 kv heads for
    the llama family, vocab 300 -- not a multiple of 128, so padding is exercised); returns it in eval mode.

    Every parameter is random (biases and norm weights too), so a swapped or dropped tensor changes the logits.
    """
    import transformers as tf

    torch.manual_seed(seed)
    base = kind.removesuffix("_rm").removesuffix("_tied")
    common = {"vocab_size": 300, "initializer_range": 0.1}
    if base == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=64, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common,
        )  # fmt: skip
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[base]
        cfg = cls(
            hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=kind.endswith("_tied"), **common,
        )  # fmt: skip
    if kind.endswith("_rm"):
        cfg.num_labels, cfg.pad_token_id = 1, 0
    for key, value in config.items():
        setattr(cfg, key, value)
    prefix = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[base]
    suffix = (
        "ForSequenceClassification" if kind.endswith("_rm") else ("LMHeadModel" if base == "gpt2" else "ForCausalLM")
    )
    model = getattr(tf, prefix + suffix)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            if name.startswith("tokenizer"):
                shutil.copy(os.path.join(tokenizer_dir, name), path)
    return model


def write_random_hf(path: str, model_type: str, layers: int, hidden: int, heads: int = 4, vocab: int = 1000) -> int:
    """A GPT2LMHeadModel or LlamaForCausalLM directory (ffn 4 * hidden) with random weights, one safetensors shard
    per layer plus the index, built layer by layer. Returns the number of parameters."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    h, ffn = hidden, 4 * hidden
    if model_type == "gpt2":
        config = {"architectures": ["GPT2LMHeadModel"], "n_embd": h, "n_layer": layers, "n_head": heads,
                  "n_positions": 128, "tie_word_embeddings": True}  # fmt: skip
    else:
        config = {
            "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        }  # fmt: skip
    config |= {"model_type": model_type, "vocab_size": vocab, "torch_dtype": "float32"}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict[str, tuple[int, ...]]) -> None:
        nonlocal total
        data = {k: torch.randn(s, generator=gen) * 0.02 for k, s in tensors.items()}
        save_file(data, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(data, name))
        total += sum(t.numel() for t in data.values())

    if model_type == "gpt2":
        shard("embed.safetensors", {"transformer.wte.weight": (vocab, h), "transformer.wpe.weight": (128, h),
                                    "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)})  # fmt: skip
    else:
        shard("embed.safetensors", {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)})
        shard("head.safetensors", {"lm_head.weight": (vocab, h)})
    for i in range(layers):
        if model_type == "gpt2":
            p = f"transformer.h.{i}."
            tensors = {
                p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                p + "mlp.c_fc.weight": (h, ffn), p + "mlp.c_fc.bias": (ffn,),
                p + "mlp.c_proj.weight": (ffn, h), p + "mlp.c_proj.bias": (h,),
            }  # fmt: skip
        else:
            p = f"model.layers.{i}."
            tensors = {
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
                p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn),
            }  # fmt: skip
        shard(f"layer{i:03d}.safetensors", tensors)
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total * 4}, "weight_map": weight_map}, f)
    return total
