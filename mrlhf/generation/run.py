"""`mrlhf generate`: load an actor from a checkpoint (any layout), generate for a prompt file, write jsonl."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from mrlhf import checkpoint as ckpt
from mrlhf.config import RunConfig
from mrlhf.data.datasets import TokenizeOptions, load_tokenized
from mrlhf.data.formats import iter_records
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.generation.generate import GenerationConfig, GenerationOutput, Generator
from mrlhf.models.roles import build_role
from mrlhf.parallel.state import ParallelContext


def load_actor(cfg: RunConfig, ctx: ParallelContext, checkpoint: str | None, tokenizer: Tokenizer):
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    model = build_role(cfg, "actor", vocab, device=ctx.device, from_checkpoint=bool(checkpoint))
    if checkpoint:
        path = ckpt.latest_checkpoint(checkpoint) or checkpoint
        ckpt.load_model(path, "actor", model)
    model.eval()
    return model


def generate_texts(model, cfg: RunConfig, tokenizer: Tokenizer, prompts: list[list[int]]) -> GenerationOutput:
    gen = GenerationConfig.from_section(cfg.generation, tokenizer.eos_id)
    engine = Generator(model, gen, tokenizer.pad_id, tokenizer.decode)
    return engine.generate(prompts)


def strip_stop(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == eos_id else tokens


GENERATED = ("index", "response", "tokens", "logprobs", "finish_reason")


def output_records(prompts_path: str, lines, out: GenerationOutput, tokenizer: Tokenizer) -> Iterator[dict]:
    """Per generation: the input record's own fields as given (its raw ``prompt`` or ``messages``, ids, metadata: what
    joins an output to its input), ``index`` (0-based position of that record in the prompt file; prompts dropped by
    ``data.length_policy=drop`` leave gaps), then what was generated. An input field with a generated field's name is
    kept as ``input_<name>``."""
    inputs = {n: (i, obj) for i, (n, obj) in enumerate(iter_records(prompts_path))}
    for j, toks in enumerate(out.tokens):
        index, obj = inputs[int(lines[j])]  # the dataset keeps each prompt's line/record number
        record = {(f"input_{k}" if k in GENERATED else k): v for k, v in obj.items()}
        record |= {
            "index": index,
            "response": tokenizer.decode(strip_stop(toks, tokenizer.eos_id)),
            "tokens": toks,
            "logprobs": out.logprobs[j],
            "finish_reason": out.finish_reasons[j],
        }
        yield record


def run_generate(cfg: RunConfig, ctx: ParallelContext, checkpoint: str | None, prompts_path: str, out_path: str) -> int:
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    options = TokenizeOptions(
        template=cfg.data.template, max_seq_len=cfg.data.max_seq_len, max_prompt_len=cfg.data.max_prompt_len,
        length_policy=cfg.data.length_policy,
    )  # fmt: skip
    dataset = load_tokenized(prompts_path, "prompt", tokenizer, options, None)
    prompts = [dataset[i] for i in range(len(dataset))]
    model = load_actor(cfg, ctx, checkpoint, tokenizer)
    out = generate_texts(model, cfg, tokenizer, prompts)
    if ctx.is_main:
        tmp = f"{out_path}.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for record in output_records(prompts_path, dataset.dense["line"], out, tokenizer):
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, out_path)
        from mrlhf.models.spec import describe_backend as describe_layers
        from mrlhf.ops.kv_ops import describe_backend

        n_dropped = getattr(dataset, "stats", {}).get("dropped", 0)
        dropped = f" ({n_dropped} prompt(s) over data.max_prompt_len dropped)" if n_dropped else ""

        print(
            f"[mrlhf] wrote {len(prompts)} generations to {out_path}{dropped} ({out.stats['wall_s']:.2f} s, "
            f"KV cache {out.stats['kv_cache_bytes'] / 2**20:.1f} MiB per stage; {describe_backend()}; "
            f"{describe_layers(cfg.model)})"
        )
    return len(prompts)
