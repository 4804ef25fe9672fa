"""`mrlhf serve` throughput: continuous batching against one-at-a-time serving of the same load, in one run.

For each layout (PP1 in one process, PP2 under torchrun on gloo), two servers on the same checkpoint answer the same
load -- ``--requests`` streamed completions of ``--max-tokens`` tokens each (greedy, ignore_eos, so every request
costs the same) -- from 1, 8 and 32 concurrent clients:

    batched        --max-running 32: requests join free rows of the in-flight ring between decode steps
    one-at-a-time  --max-running 1: one row per ring slot (PP1: one request at a time; PP2: one per stage, the
                   fewest the ring runs), the other requests wait in the server's queue

Reported per run: requests/s, generated tokens/s, time to first token (client side: request sent -> first streamed
chunk) and latency p50/p99, and the batched / one-at-a-time throughput ratio.

    .venv/bin/python benchmarks/serving.py [--layouts pp1 pp2] [--requests 64] [--max-tokens 32] [--repeat 1]

Model: GPT-2 shaped, 4 layers, hidden 256, 4 heads, the demo tokenizer (vocab 448), one SFT step (speed does not
depend on the weights); fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
MODEL = ["model.flavour=gpt2", "model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
         "model.num_query_groups=null", "model.ffn_hidden_size=1024", "model.max_position_embeddings=512"]  # fmt: skip
CLIENTS = (1, 8, 32)


def make_checkpoint(out: str) -> str:
    """One SFT step through the CLI: a real training checkpoint of the benchmark's shape."""
    cmd = [os.path.join(VENV_BIN, "mrlhf"), "sft", "--config", os.path.join(ROOT, "configs", "sft_demo.yaml"), *MODEL,
           f"training.output_dir={out}", "training.train_steps=1", "checkpoint.save_interval=1", "data.eval_path=null",
           "training.global_batch_size=8", "training.micro_batch_size=8", "logging.progress_bar=false"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(out, "checkpoints")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: str, pp: int, max_running: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = ["serve", "--checkpoint", ckpt, "--port", str(self.port), "--model-name", "bench",
                 "--max-running", str(max_running), "--max-queue", "1024"]  # fmt: skip
        if pp == 1:
            cmd = [os.path.join(VENV_BIN, "mrlhf"), *serve]
        else:
            cmd = [os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", str(pp), "-m", "mrlhf.cli", *serve,
                   f"parallel.pp={pp}"]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # one core per rank, one for clients
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 180
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> int:
        """SIGTERM to rank 0 (under torchrun: to the rank-0 worker, which drains and stops the others; torchrun's own
        SIGTERM handling would end in exit code 1)."""
        import psutil

        target = self.proc.pid
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "0":
                    target = child.pid
            except psutil.Error:
                pass
        os.kill(target, signal.SIGTERM)
        return self.proc.wait(timeout=120)


async def one(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(time to first chunk, latency, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, tokens


async def load(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """``len(prompts)`` requests from ``clients`` concurrent clients, each client taking the next prompt in turn."""
    queue = list(enumerate(prompts))
    results: list[tuple[float, float, int]] = []

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            while queue:
                _, p = queue.pop(0)
                body = {"model": "bench", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
                results.append(await one(c, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    ttft, lat = sorted(r[0] for r in results), sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    assert tokens == len(prompts) * max_tokens, (tokens, len(prompts) * max_tokens)

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]

    return {"rps": len(results) / wall, "tps": tokens / wall, "ttft50": statistics.median(ttft), "ttft99": p99(ttft),
            "lat50": statistics.median(lat), "lat99": p99(lat)}  # fmt: skip


def run_layout(ckpt: str, pp: int, prompts: list[str], max_tokens: int, repeat: int) -> dict:
    """Every (server, clients) measurement; with ``repeat`` > 1 the run of the highest throughput (the one least
    disturbed by other work on the machine)."""
    out = {}
    for name, running in (("batched", 32), ("one-at-a-time", 1)):
        server = Server(ckpt, pp, running)
        try:
            asyncio.run(load(server.url, prompts[:8], 8, max_tokens))  # warm-up
            for clients in CLIENTS:
                runs = [asyncio.run(load(server.url, prompts, clients, max_tokens)) for _ in range(repeat)]
                out[(name, clients)] = max(runs, key=lambda r: r["tps"])
        finally:
            code = server.stop()
        assert code == 0, f"server exited with {code} after SIGTERM"
    return out


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["pp1", "pp2"], choices=["pp1", "pp2"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported")
    args = ap.parse_args()
    import torch

    print(f"# serving benchmark  {time.strftime('%Y-%m-%d')}  {cpu_name()}  cores={os.cpu_count()}  "
          f"torch {torch.__version__}  {args.requests} requests x {args.max_tokens} tokens, greedy, streamed, "
          f"best of {args.repeat}  "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    with open(os.path.join(ROOT, "mrlhf", "assets", "demo", "prompts_eval.jsonl")) as f:
        texts = [json.loads(line)["prompt"] for line in f]
    prompts = [f"<|user|>\n{texts[i % len(texts)]}\n<|assistant|>\n" for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(tmp)
        print(f"{'layout':>6} {'server':>14} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'lat p50':>8} {'lat p99':>8} {'vs one-at-a-time':>17}")  # fmt: skip
        for layout in args.layouts:
            res = run_layout(ckpt, int(layout[2:]), prompts, args.max_tokens, args.repeat)
            print(f"# {layout} done, load average {os.getloadavg()[0]:.1f}")
            for (name, clients), r in res.items():
                ratio = r["tps"] / res[("one-at-a-time", clients)]["tps"]
                print(f"{layout:>6} {name:>14} {clients:>7} {r['rps']:7.1f} {r['tps']:7.0f} {r['ttft50'] * 1e3:7.0f}ms "
                      f"{r['ttft99'] * 1e3:7.0f}ms {r['lat50'] * 1e3:6.0f}ms {r['lat99'] * 1e3:6.0f}ms "
                      f"{ratio:16.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
