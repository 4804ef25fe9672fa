"""The device check's measurements (scripts/gpu_check.sh runs it after the build and the CUDA tests).

1. stages: `mrlhf sft|rm|dpo|ppo|generate` for a few steps on the demo task, fp32 and bf16, one process (NCCL at
   world 1 -- every collective still checks that its tensors are on the GPU); PPO's per-phase CUDA peak memory.
2. greedy: mrlhf greedy tokens against HF `generate` on the same weights (converted in memory), fp32 and bf16.
3. decode: tokens/s of a 1.3B-shaped LLaMA (24 layers, hidden 2048, 16 heads, vocab 32000, bf16) at batch 1 and 64,
   prompt 32, 128 new tokens, mrlhf vs HF `generate` vs the HBM roofline: batch / ((weight bytes + mean KV bytes read
   per step) / HBM bandwidth), 4.8 TB/s for an H200.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--device cuda|cpu] [--quick] [--dry-run]

Each part records its own error instead of stopping the others; one JSON file holds everything. ``--device cpu
--quick`` runs the same code on small shapes (to check the script itself where no GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
HBM_BYTES_PER_S = 4.8e12
DECODE_SHAPE = ["model.flavour=llama", "model.num_layers=24", "model.hidden_size=2048", "model.num_attention_heads=16",
                "model.num_query_groups=16", "model.ffn_hidden_size=5632", "model.max_position_embeddings=512",
                "data.max_seq_len=512", "data.max_prompt_len=64"]  # fmt: skip
QUICK_SHAPE = ["model.flavour=llama", "model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
               "model.num_query_groups=2", "model.ffn_hidden_size=352", "model.max_position_embeddings=512",
               "data.max_seq_len=512", "data.max_prompt_len=64"]  # fmt: skip


def cli(args: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "mrlhf.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-4:]
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 2), "tail": tail}


def plan_vs_measured(run_args: list[str], record: dict) -> dict:
    """``mrlhf plan`` (on this device) for the same run against its measured per-phase report: the keys that differ (none is
    the claim of docs/launch.md) and each phase's planned peak next to CUDA's measured peak (which adds activations,
    the allocator's slack and what the plan does not count); the KV cache apart, as the bound it is."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = subprocess.run([sys.executable, "-m", "mrlhf.cli", "plan", "ppo", "--json", "--device", device, *run_args],
                          cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    if proc.returncode != 0:
        return {"rc": proc.returncode, "tail": proc.stderr.strip().splitlines()[-3:]}
    (rank,) = json.loads(proc.stdout)["ranks"]
    differ, kv = {}, {}
    for phase, want in rank["phases"].items():
        for key, v in want.items():
            got = record.get(f"{phase}_{key}", 0.0)
            if key == "mem_kv_cache_bytes":  # planned at data.max_prompt_len: an upper bound for shorter prompts
                kv[phase] = {"plan": v, "measured": got, "within": got <= v}
            elif got != v:
                differ[f"{phase}_{key}"] = {"plan": v, "measured": got}
    peaks = {phase: {"plan": rank["peak"][phase], "cuda_max_allocated": record.get(f"{phase}_mem_cuda_max_allocated_bytes")}
             for phase in rank["phases"]}  # fmt: skip
    return {"rc": 0, "differ": differ, "kv_cache": kv, "peaks": peaks}


def stages(work: str, quick: bool) -> dict:
    steps = 2 if quick else 4
    out: dict = {}
    for precision in ("fp32", "bf16"):
        d = os.path.join(work, precision)
        common = [f"training.precision={precision}", f"training.train_steps={steps}", "training.eval_interval=0",
                  "logging.progress_bar=false", "checkpoint.save_interval=0", "training.eval_samples=64"]  # fmt: skip
        res = {}
        res["sft"] = cli(["sft", "--config", "configs/sft_demo.yaml", *common, f"training.output_dir={d}/sft"], 300)
        sft = f"{d}/sft/checkpoints"
        res["rm"] = cli(["rm", "--config", "configs/rm_demo.yaml", *common, f"training.output_dir={d}/rm",
                         f"checkpoint.load_dir={sft}"], 300)  # fmt: skip
        res["dpo"] = cli(["dpo", "--config", "configs/dpo_demo.yaml", *common, f"training.output_dir={d}/dpo",
                          f"checkpoint.load_dir={sft}"], 300)  # fmt: skip
        grpo = ["ppo.estimator=grpo", "ppo.n_samples=4", "training.global_batch_size=16"]
        for est, extra in (("gae", ["ppo.estimator=gae", f"ppo.critic_load_dir={d}/rm/checkpoints"]),
                           ("grpo", [*grpo, f"ppo.critic_load_dir={d}/rm/checkpoints"]),
                           ("grpo_fn", [*grpo, "ppo.critic_load_dir=null",  # a Python reward on TP0 of the last stage
                                        "ppo.reward_function=mrlhf.demo.judge:reward"])):  # fmt: skip
            run_args = ["--config", "configs/ppo_demo.yaml", *common, *extra, f"training.output_dir={d}/ppo_{est}",
                        f"ppo.actor_load_dir={sft}"]  # fmt: skip
            res[f"ppo_{est}"] = cli(["ppo", *run_args], 300)
            metrics = f"{d}/ppo_{est}/metrics.jsonl"
            if os.path.exists(metrics):
                with open(metrics, encoding="utf-8") as f:
                    last = [json.loads(line) for line in f if line.strip()][-1]  # the last iteration: steady state
                res[f"ppo_{est}"]["memory"] = {k: v for k, v in last.items() if "_mem_" in k}
                res[f"ppo_{est}"]["phases_s"] = {k: last[k] for k in last if k.startswith("time_")}
                res[f"ppo_{est}"]["plan"] = plan_vs_measured(run_args, last)
        res["generate"] = cli(["generate", "--checkpoint", sft, "--prompts", "mrlhf/assets/demo/prompts_eval.jsonl",
                               "--out", f"{d}/gen.jsonl", "generation.temperature=0"], 300)  # fmt: skip
        out[precision] = res
    return out


def _build(overrides: list[str], device_type: str, vocab: int, precision: str):
    from mrlhf.config import load_config
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import destroy_distributed, init_distributed

    destroy_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    cfg = load_config(None, [*overrides, f"model.vocab_size={vocab}", f"training.precision={precision}",
                             f"parallel.backend={backend}"])  # fmt: skip
    ctx = init_distributed(cfg, "generate")
    return cfg, ctx, build_role(cfg, "actor", vocab, seed=1, device=ctx.device).eval()


def _hf_copy(model, cfg, vocab: int, device):
    import torch
    import transformers

    from mrlhf.convert.hf import full_state_dict, to_hf_llama

    config, sd = to_hf_llama(full_state_dict(model), cfg, vocab)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    hf.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    dtype = next(model.parameters()).dtype
    return hf.to(device=device, dtype=dtype).eval(), torch


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).tolist()


def _ours(model, prompts: list[list[int]], n: int):
    from mrlhf.generation.generate import GenerationConfig, Generator
    from mrlhf.generation.sampling import SamplingParams

    gen = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0.0), micro_batch_size=len(prompts))
    return Generator(model, gen, pad_id=0).generate(prompts)


def _hf_generate(hf, torch, prompts: list[list[int]], n: int, device):
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)  # fmt: skip


def greedy(device_type: str, quick: bool) -> dict:
    out = {}
    vocab = 1000
    for precision in ("fp32", "bf16"):
        cfg, ctx, model = _build(QUICK_SHAPE, device_type, vocab, precision)
        hf, torch = _hf_copy(model, cfg, vocab, ctx.device)
        prompts, n = _prompts(8, 16, vocab), 32
        mine = _ours(model, prompts, n).tokens
        theirs = _hf_generate(hf, torch, prompts, n, ctx.device)[:, 16:].tolist()
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), n) for x, y in zip(mine, theirs)]
        out[precision] = {"identical_sequences": sum(a == n for a in agree), "of": len(prompts),
                          "mean_tokens_before_first_difference": sum(agree) / len(agree)}  # fmt: skip
    return out


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        import torch

        torch.cuda.synchronize()


def decode(device_type: str, quick: bool) -> dict:
    vocab = 1000 if quick else 32000
    cfg, ctx, model = _build(QUICK_SHAPE if quick else DECODE_SHAPE, device_type, vocab, "bf16")
    hf, torch = _hf_copy(model, cfg, vocab, ctx.device)
    m = cfg.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = m.hidden_size // m.num_attention_heads
    new, prompt = (16, 32) if quick else (128, 32)
    out = {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes, "new_tokens": new}
    for batch in (1, 64):
        prompts = _prompts(batch, prompt, vocab)
        _ours(model, prompts, 4), _hf_generate(hf, torch, prompts, 4, ctx.device)  # warm-up
        _sync(device_type)
        t0 = time.perf_counter()
        _ours(model, prompts, new)
        _sync(device_type)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        _hf_generate(hf, torch, prompts, new, ctx.device)
        _sync(device_type)
        t_hf = time.perf_counter() - t0
        mean_ctx = prompt + new / 2
        kv_bytes = 2 * m.num_layers * m.query_groups * head_dim * mean_ctx * batch * 2  # K and V, bf16, per step
        roofline = batch / ((weight_bytes + kv_bytes) / HBM_BYTES_PER_S)
        toks = batch * new
        out[f"batch{batch}"] = {"mrlhf_tok_s": toks / t_ours, "hf_tok_s": toks / t_hf, "ratio_vs_hf": t_hf / t_ours,
                                "roofline_tok_s": roofline, "fraction_of_roofline": toks / t_ours / roofline}  # fmt: skip
    return out


def dry_run() -> int:
    """Check what the run will need, without torch: configs, assets, tools."""
    need = ["configs/sft_demo.yaml", "configs/rm_demo.yaml", "configs/dpo_demo.yaml", "configs/ppo_demo.yaml",
            "mrlhf/assets/demo/prompts_eval.jsonl", "mrlhf/assets/demo/tokenizer.model", "mrlhf/convert/hf.py"]  # fmt: skip
    missing = [p for p in need if not os.path.exists(os.path.join(ROOT, p))]
    print("gpu_check.py parts: stages (fp32, bf16), greedy vs HF (fp32, bf16), decode tok/s (batch 1, 64)")
    for p in missing:
        print(f"gpu_check.py: missing {p}")
    return 1 if missing else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "gpu_check.json"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small shapes (a check of the script itself)")
    ap.add_argument("--parts", nargs="+", default=["stages", "greedy", "decode"])
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        return dry_run()
    import torch

    results: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for part in args.parts:
            start = time.perf_counter()
            try:
                fn = {"stages": lambda: stages(work, args.quick), "greedy": lambda: greedy(args.device, args.quick),
                      "decode": lambda: decode(args.device, args.quick)}[part]  # fmt: skip
                results[part] = fn()
            except Exception:
                results[part] = {"error": traceback.format_exc().splitlines()[-6:]}
            results[part + "_seconds"] = round(time.perf_counter() - start, 1)
            with open(args.out, "w", encoding="utf-8") as f:  # after every part: a killed run keeps what it did
                json.dump(results, f, indent=1, default=str)
            print(json.dumps({part: results[part]}, default=str)[:2000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
