"""The mrlhf half of benchmarks/ppo_vs_trl.py: seconds per PPO / GRPO iteration of `mrlhf ppo` on the benchmark shape.

Shape (the same as the TRL half): GPT-2 flavour, 4 layers, hidden 256, 4 heads, vocab 8000, random init for every
role, 16 prompts of exactly 32 tokens, exactly 64 generated tokens (EOS ignored), 1 PPO epoch, 1 minibatch, fp32, one
process. PPO builds all four roles (actor, reference, critic, reward model); GRPO builds actor and reference (4
prompts x 4 samples = 16 sequences, the TRL GRPO shape) and scores with a trivial Python reward function
(``ppo.reward_function``), as TRL's GRPO does. Old log-probs come from the rollout (``ppo.old_logprobs=rollout``),
as in TRL's PPO
(generation scores) and GRPO (num_iterations 1: the policy's own detached log-probs): neither runs a separate policy
scoring pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "mrlhf", "assets", "demo", "tokenizer.model")
PROMPT_TOKENS, NEW_TOKENS, BATCH = 32, 64, 16


def _prompt_file(directory: str, n: int = 64) -> str:
    """Prompts whose rendered form is exactly PROMPT_TOKENS tokens (bos + plain template + text)."""
    from mrlhf.data.datasets import TokenizeOptions, load_tokenized
    from mrlhf.data.tokenizer import Tokenizer

    tok = Tokenizer.load(TOKENIZER)
    words = "What is 3 plus 4 and then 7 times 8 minus 2".split()
    path = os.path.join(directory, "prompts.jsonl")
    opts = TokenizeOptions(max_seq_len=512, max_prompt_len=256)
    texts = []
    for i in range(n):
        k = 1
        while True:  # grow the text until the rendered prompt reaches the target length
            text = " ".join(words[(i + j) % len(words)] for j in range(k))
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"prompt": text}) + "\n")
            length = len(load_tokenized(path, "prompt", tok, opts, None)[0])
            if length >= PROMPT_TOKENS:
                break
            k += 1
        if length == PROMPT_TOKENS:
            texts.append(text)
    if len(texts) < BATCH:
        raise RuntimeError(f"could only build {len(texts)} prompts of exactly {PROMPT_TOKENS} tokens")
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"prompt": text}) + "\n")
    return path


def even_share(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """GRPO's reward: the share of even token ids in a completion -- the TRL side's own function, trivial and ~free."""
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


def overrides(algo: str, prompts: str, out: str, iterations: int) -> list[str]:
    grpo = algo == "grpo"
    return [
        "model.flavour=gpt2", "model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
        "model.num_query_groups=null", "model.ffn_hidden_size=null", "model.vocab_size=8000",
        "model.max_position_embeddings=128",
        f"data.train_path={prompts}", "data.eval_path=null", f"data.tokenizer_path={TOKENIZER}",
        "data.max_seq_len=128", "data.max_prompt_len=64", "data.cache_dir=null",
        f"training.train_steps={iterations}", f"training.global_batch_size={4 if grpo else BATCH}",
        f"training.micro_batch_size={BATCH}", "training.eval_interval=0", f"training.output_dir={out}",
        f"generation.max_new_tokens={NEW_TOKENS}", "generation.ignore_eos=true", "generation.temperature=1.0",
        f"generation.micro_batch_size={BATCH}",
        f"ppo.estimator={'grpo' if grpo else 'gae'}", f"ppo.n_samples={4 if grpo else 1}", "ppo.ppo_epochs=1",
        "ppo.kl_coef=0.05",
        *(["ppo.kl_placement=loss", "ppo.kl_estimator=k3", "ppo.critic_load_dir=null",
           "ppo.reward_function=benchmarks.mrlhf_ppo_side:even_share"] if grpo else []),
        "ppo.num_minibatches=1", "ppo.old_logprobs=rollout", "ppo.offload_frozen=false", "checkpoint.enabled=false",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ]  # fmt: skip


def mrlhf_side(algo: str, iterations: int, warmup: int, threads: int = 2) -> dict:
    """Mean and std of seconds per iteration after ``warmup`` iterations, and the share spent generating."""
    import torch

    torch.set_num_threads(threads)
    from mrlhf.config import load_config
    from mrlhf.parallel.state import destroy_distributed, init_distributed
    from mrlhf.trainers.ppo import train_ppo

    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved_env = {k: os.environ.pop(k) for k in dist_env if k in os.environ}  # a fresh port for each run
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # logs off the JSON stdout
        prompts = _prompt_file(tmp)
        cfg = load_config(None, overrides(algo, prompts, os.path.join(tmp, "run"), warmup + iterations))
        ctx = init_distributed(cfg, "ppo")
        try:
            records = train_ppo(cfg, ctx)["records"][warmup:]
        finally:
            destroy_distributed()
            for k in dist_env:  # the TRL subprocess that runs next must not inherit this run's rendezvous
                os.environ.pop(k, None)
            os.environ.update(saved_env)
    times = [r["iteration_time_s"] for r in records]
    gen = sum(r["time_generate_s"] for r in records) / sum(times)
    return {
        "algo": algo,
        "seconds_per_iteration": statistics.fmean(times),
        "std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "median": statistics.median(times),
        "min": min(times),
        "times": times,
        "generation_share": gen,
        "phases": {k: statistics.fmean(r[f"time_{k}_s"] for r in records) for k in ("generate", "experience", "train")},
        "iterations": len(times),
        "response_length": statistics.fmean(r["response_length"] for r in records),
    }


if __name__ == "__main__":
    import sys

    sys.path.insert(0, ROOT)  # GRPO's reward function is imported by name: benchmarks.mrlhf_ppo_side:even_share
    print(json.dumps(mrlhf_side(sys.argv[1] if len(sys.argv) > 1 else "ppo", 3, 1)))
