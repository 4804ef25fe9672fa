"""Generation benchmarks, each a comparison in one run (CPU by default; CUDA when available and --device cuda).

(a) incremental decoding over the KV cache vs full recompute (no cache), tokens/s at several lengths, batch 4 and 16;
(b) mrlhf vs HF transformers ``generate`` (KV cache on) on the same weights, greedy, batch 16, prompt 32;
(c) pipeline busy fraction per stage at PP=2 and PP=4 on gloo: S >= PP interleaved slots (S = PP, and PP + 1 for one
    tick of slack) vs one microbatch walking the pipeline (S = 1).

    .venv/bin/python benchmarks/generation.py [--parts a b c p k] [--quick]

(p) where a decode step's time goes (torch profiler), at batch 4 and 16.
(k) the CPU kernels alone (decode_linear, decode_attention), cold and hot, against their torch counterparts.

Model: GPT-2 shaped, 4 layers, hidden 256, 4 heads, vocab 8000, random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

MODEL = [
    "model.flavour=gpt2", "model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
    "model.max_position_embeddings=1024", "data.max_seq_len=1024", "data.max_prompt_len=64",
]  # fmt: skip
VOCAB = 8000


def build(overrides: list[str]):
    import torch

    from mrlhf.config import load_config
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed

    cfg = load_config(None, MODEL + overrides)
    ctx = init_distributed(cfg)
    model = build_role(cfg, "actor", VOCAB, seed=1).to(ctx.device).eval()
    torch.manual_seed(0)
    return cfg, ctx, model


def prompts(batch: int, length: int = 32) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(4, VOCAB, (batch, length), generator=g).tolist()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def part_a(lengths: list[int], batches: list[int]) -> None:
    from mrlhf.generation.generate import GenerationConfig, Generator, generate_full_recompute
    from mrlhf.generation.sampling import SamplingParams

    cfg, ctx, model = build([])
    print("\n(a) incremental (KV cache) vs full recompute, greedy, prompt 32 (one untimed warm-up call each)")
    print(f"{'batch':>5} {'new tokens':>10} {'cache tok/s':>12} {'recompute tok/s':>16} {'speed-up':>9} {'same tokens':>12}")
    for batch in batches:
        ps = prompts(batch)
        warm = GenerationConfig(max_new_tokens=4, sampling=SamplingParams(temperature=0.0), micro_batch_size=batch)
        Generator(model, warm, pad_id=0).generate(ps)
        generate_full_recompute(model, ps, warm, pad_id=0)
        for n in lengths:
            gen = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0.0), micro_batch_size=batch)
            fast, t_fast = timed(lambda g=gen, p=ps: Generator(model, g, pad_id=0).generate(p))
            slow, t_slow = timed(lambda g=gen, p=ps: generate_full_recompute(model, p, g, pad_id=0))
            toks = batch * n
            print(f"{batch:>5} {n:>10} {toks / t_fast:>12.0f} {toks / t_slow:>16.0f} {t_slow / t_fast:>8.1f}x "
                  f"{str(fast.tokens == slow.tokens):>12}")  # fmt: skip


def part_b(lengths: list[int], batch: int) -> None:
    import torch
    import transformers

    from mrlhf.convert.hf import full_state_dict, to_hf_gpt2
    from mrlhf.generation.generate import GenerationConfig, Generator
    from mrlhf.generation.sampling import SamplingParams

    cfg, ctx, model = build([])
    config, sd = to_hf_gpt2(full_state_dict(model), cfg, VOCAB)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "attn.bias" not in k and "masked_bias" not in k], missing
    hf.eval()
    ps = prompts(batch)
    ids = torch.tensor(ps)

    def hf_generate(n: int):
        with torch.no_grad():
            return hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                use_cache=True, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip

    def ours(n: int, fused: bool = True):
        gen = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0.0), micro_batch_size=batch)
        return Generator(model, gen, pad_id=0, fused_linear=fused).generate(ps)

    hf_generate(4), ours(4), ours(4, False)  # warm-up
    print(f"\n(b) mrlhf vs HF transformers {transformers.__version__} generate (use_cache=True), greedy, batch {batch}, "
          f"prompt 32 (one untimed warm-up call each; 'BLAS' = mrlhf with torch.matmul instead of decode_linear)")  # fmt: skip
    print(f"{'new tokens':>10} {'mrlhf tok/s':>12} {'BLAS tok/s':>11} {'HF tok/s':>10} {'ratio':>7} {'same tokens':>12}")
    for n in lengths:
        theirs, t_hf = timed(lambda n=n: hf_generate(n))
        mine, t_ours = timed(lambda n=n: ours(n))
        _, t_blas = timed(lambda n=n: ours(n, False))
        same = theirs[:, 32:].tolist() == mine.tokens
        toks = batch * n
        print(f"{n:>10} {toks / t_ours:>12.0f} {toks / t_blas:>11.0f} {toks / t_hf:>10.0f} {t_hf / t_ours:>6.2f}x "
              f"{str(same):>12}")  # fmt: skip


# Part (c) uses 24 layers so that whole layers can balance the stages (with 8, one layer is an eighth of the model).
# The last stage also runs the LM head (vocab 8000 x hidden 256, about two layers of decode work) and the sampler,
# so it gets fewer layers (megatron's uneven first/last stage sizes): 13/11 at PP=2 (12/12 leaves the first stage
# waiting ~20% of the time for the second), 7/6/6/5 at PP=4.
C_LAYERS = 24
STAGE_SPLIT = {2: ["parallel.first_stage_layers=13", "parallel.last_stage_layers=11"],
               4: ["parallel.first_stage_layers=7", "parallel.last_stage_layers=5"]}  # fmt: skip


def worker_c(out: str, slots: int, new_tokens: int, batch: int, n_prompts: int) -> None:
    """One rank of part (c), launched by torchrun."""
    import torch

    from mrlhf.generation.generate import GenerationConfig, Generator
    from mrlhf.generation.sampling import SamplingParams

    pp = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    cfg, ctx, model = build([f"parallel.pp={pp}", f"model.num_layers={C_LAYERS}", *STAGE_SPLIT.get(pp, [])])
    gen = GenerationConfig(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0.0), micro_batch_size=batch,
                           num_slots=slots)  # fmt: skip
    result = Generator(model, gen, pad_id=0).generate(prompts(n_prompts))
    if ctx.rank == 0:
        with open(out, "w") as f:
            json.dump({"stats": result.stats, "tokens": result.tokens}, f)


def part_c(pps: list[int], new_tokens: int) -> None:
    print(f"\n(c) pipeline busy fraction per stage (gloo, 1 thread per rank), {C_LAYERS} layers, {new_tokens} new tokens, "
          "96 prompts in microbatches of 16")  # fmt: skip
    print(f"{'PP':>3} {'schedule':>12} {'tok/s':>8} {'stage busy fractions':>30} {'mean':>6} "
          f"{'waiting in send/recv':>26}")  # fmt: skip
    for pp in pps:
        rows = {}
        for name, slots in ((f"S={pp + 1}", pp + 1), (f"S={pp}", pp), ("naive S=1", 1)):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pp}",
                       __file__, "--worker-c", out, str(slots), str(new_tokens)]  # fmt: skip
                proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
                if proc.returncode:
                    raise SystemExit(f"PP={pp} {name} failed:\n{proc.stderr[-3000:]}")
                with open(out) as f:
                    r = json.load(f)
            st = r["stats"]
            frac = st["stage_busy_fraction"]
            rows[name] = r["tokens"]
            toks = sum(len(t) for t in r["tokens"])
            wait = " ".join(f"{x:.2f}" for x in st["stage_comm_fraction"])
            print(f"{pp:>3} {name:>12} {toks / st['wall_s']:>8.0f} {' '.join(f'{x:.2f}' for x in frac):>30} "
                  f"{sum(frac) / len(frac):>6.2f} {wait:>26}")  # fmt: skip
        assert rows[f"S={pp}"] == rows["naive S=1"] == rows[f"S={pp + 1}"], "every schedule must generate the same tokens"


def part_p(batches: list[int], new_tokens: int) -> None:
    """Where a decode step's time goes: torch profiler self time per op, per generated token step (greedy,
    prompt 32), next to the unprofiled wall time of the same call."""
    from torch.profiler import ProfilerActivity, profile

    from mrlhf.generation.generate import GenerationConfig, Generator
    from mrlhf.generation.sampling import SamplingParams

    cfg, ctx, model = build([])
    print(f"\n(p) decode step breakdown, {new_tokens} new tokens (torch profiler, self CPU time per step)")
    for batch in batches:
        gen = GenerationConfig(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0.0),
                               micro_batch_size=batch)  # fmt: skip
        ps = prompts(batch)
        Generator(model, gen, pad_id=0).generate(ps)
        _, wall = timed(lambda g=gen, p=ps: Generator(model, g, pad_id=0).generate(p))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            Generator(model, gen, pad_id=0).generate(ps)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / 1e3 / new_tokens
        print(f"batch {batch}: wall {wall * 1e3 / new_tokens:.2f} ms/step; ops {total:.2f} ms/step (profiled)")
        for e in events[:8]:
            print(f"  {e.key:<32} {e.self_cpu_time_total / 1e3 / new_tokens:>7.3f} ms/step {e.count / new_tokens:>6.1f} calls")


def part_k() -> None:
    """The CPU kernels alone, weights/caches cold (cycled through ~100 MB so each call reads DRAM) and hot (one
    buffer, in L3), against their torch counterparts on the same data: F.linear, the reference attention, and
    torch.sum over the same cache bytes (what the memory system gives a plain streaming read)."""
    import torch
    import torch.nn.functional as F

    from mrlhf.ops import reference

    def per_call(fn, reps: int = 100) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6

    def cycled(make, total_bytes: int, one_bytes: int):
        bufs = [make() for _ in range(max(2, total_bytes // one_bytes))]
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % len(bufs)
            return bufs[state["i"]]

        return bufs[0], nxt

    print(f"\n(k) CPU kernels alone, us per call, path {torch.ops.mrlhf.cpu_isa()} (cold: weights/cache cycled through "
          "~100 MB; hot: one buffer)")  # fmt: skip
    print(f"{'decode_linear N x K':>20} {'rows':>5} {'ours cold':>10} {'F.linear cold':>14} {'ratio':>6} "
          f"{'ours hot':>9} {'F.linear hot':>13}")  # fmt: skip
    for n, k in ((8000, 256), (1024, 256), (256, 1024), (768, 256)):
        hot, nxt = cycled(lambda n=n, k=k: torch.randn(n, k), 100 << 20, n * k * 4)
        for m in (1, 4, 16):
            x = torch.randn(m, k)
            ours_c = per_call(lambda x=x, nxt=nxt: torch.ops.mrlhf.decode_linear(x, nxt(), None))
            blas_c = per_call(lambda x=x, nxt=nxt: F.linear(x, nxt()))
            ours_h = per_call(lambda x=x, hot=hot: torch.ops.mrlhf.decode_linear(x, hot, None))
            blas_h = per_call(lambda x=x, hot=hot: F.linear(x, hot))
            print(f"{f'{n} x {k}':>20} {m:>5} {ours_c:>10.0f} {blas_c:>14.0f} {blas_c / ours_c:>5.1f}x "
                  f"{ours_h:>9.0f} {blas_h:>13.0f}")  # fmt: skip
    b, cap, g, d = 16, 288, 4, 64
    print(f"{'decode_attention':>20} {'slots':>5} {'ours cold':>10} {'torch.sum cold':>14} {'GB/s':>6} "
          f"{'ours hot':>9} {'reference hot':>13}   (batch {b}, {g} heads x {d}, cache {cap} slots)")  # fmt: skip
    one = 2 * b * cap * g * d * 4
    hot, nxt = cycled(lambda: (torch.randn(b, cap, g, d), torch.randn(b, cap, g, d)), 100 << 20, one)
    q, starts = torch.randn(b, g, d), torch.zeros(b, dtype=torch.long)
    att = torch.ops.mrlhf.decode_attention
    for slots in (64, 160, 288):
        lens = torch.full((b,), slots, dtype=torch.long)
        ours_c = per_call(lambda lens=lens: att(q, *nxt(), starts, lens, None, None, 0.125, 0))
        sum_c = per_call(lambda slots=slots: [t[:, :slots].sum() for t in nxt()])
        ours_h = per_call(lambda lens=lens: att(q, *hot, starts, lens, None, None, 0.125, 0))
        ref_h = per_call(lambda lens=lens: reference.decode_attention(q, *hot, starts, lens, None, None, 0.125, 0), 20)
        gbs = 2 * b * slots * g * d * 4 / ours_c / 1e3
        print(f"{'':>20} {slots:>5} {ours_c:>10.0f} {sum_c:>14.0f} {gbs:>6.1f} {ours_h:>9.0f} {ref_h:>13.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c", "p", "k"])
    ap.add_argument("--quick", action="store_true", help="shorter lengths (smoke run)")
    ap.add_argument("--worker-c", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_c:
        out, slots, n = args.worker_c
        worker_c(out, int(slots), int(n), batch=16, n_prompts=96)
        return
    import torch

    from mrlhf.ops.kv_ops import describe_backend

    print(f"# generation benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()}  cores={os.cpu_count()}  "
          f"torch {torch.__version__} threads={torch.get_num_threads()}  kv ops: {describe_backend()}")  # fmt: skip
    if "a" in args.parts:
        part_a([16, 32] if args.quick else [128, 256, 512], batches=[4] if args.quick else [4, 16])
    if "b" in args.parts:
        part_b([16] if args.quick else [64, 256], batch=16)
    if "c" in args.parts:
        part_c([2] if args.quick else [2, 4], new_tokens=8 if args.quick else 64)
    if "p" in args.parts:
        part_p(batches=[4, 16], new_tokens=32 if args.quick else 256)
    if "k" in args.parts:
        part_k()


if __name__ == "__main__":
    main()
