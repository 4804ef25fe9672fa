"""Rank functions and helpers for the serving tests: a small SFT checkpoint, `mrlhf generate` and `mrlhf serve` run
through the real CLI on forked ranks, and a server handle that a test talks to over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
from harness import free_port, run_ranks
from stage_runs import DEMO

from mrlhf.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTEXT = (
    1024  # model.max_position_embeddings of the test checkpoint (long enough for a stream to outlast a disconnect)
)
PROMPTS = [json.loads(line)["prompt"] for line in open(os.path.join(DEMO, "prompts_eval.jsonl"))][:6]


def checkpoint_rank(rank: int, out: str) -> str:
    """A short SFT run on 64 demo records (sharp enough that greedy choices are not near-ties)."""
    from mrlhf.parallel.state import init_distributed
    from mrlhf.trainers.sft import train_sft

    data = os.path.join(out, "sft.jsonl")
    with open(os.path.join(DEMO, "sft_train.jsonl")) as src, open(data, "w") as dst:
        dst.writelines(line for _, line in zip(range(64), src))
    cfg = load_config(os.path.join(ROOT, "configs", "sft_demo.yaml"), [
        f"training.output_dir={out}", f"data.train_path={data}", "data.eval_path=null", "training.train_steps=30",
        "training.global_batch_size=8", "training.micro_batch_size=8", "scheduler.warmup_steps=3",
        f"model.max_position_embeddings={CONTEXT}", "checkpoint.save_interval=30", "logging.progress_bar=false",
    ])  # fmt: skip
    train_sft(cfg, init_distributed(cfg))
    return os.path.join(out, "checkpoints")


def cli_rank(rank: int, argv: list[str], pidfile: str | None = None) -> int:
    """`mrlhf ARGV` on this rank (rank 0 writes its pid first, so a test can send it SIGTERM)."""
    from mrlhf.cli import main

    if pidfile and rank == 0:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)
    return main(argv)


def write_prompts(path: str, prompts: list[str]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return path


def generate(ckpt: str, out_dir: str, layout: dict[str, int], max_new_tokens: int) -> list[dict]:
    """`mrlhf generate` (greedy) of PROMPTS at ``layout``; its jsonl records."""
    world = layout.get("tp", 1) * layout.get("pp", 1)
    prompts = write_prompts(os.path.join(out_dir, "prompts.jsonl"), PROMPTS)
    out = os.path.join(out_dir, f"gen_pp{layout.get('pp', 1)}.jsonl")
    argv = ["generate", "--checkpoint", ckpt, "--prompts", prompts, "--out", out, "generation.temperature=0",
            f"generation.max_new_tokens={max_new_tokens}"] + [f"parallel.{k}={v}" for k, v in layout.items()]  # fmt: skip
    assert run_ranks(cli_rank, world, argv) == [0] * world
    return [json.loads(line) for line in open(out)]


def raw_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """One request over a plain socket, headers exactly as given (httpx refuses a Content-Length that lies)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


class Server:
    """`mrlhf serve` on forked ranks (rank 0 on 127.0.0.1:port), stopped with SIGTERM to rank 0."""

    def __init__(self, ckpt: str, tmp: str, layout: dict[str, int], flags: list[str], api_key: str | None) -> None:
        self.world = layout.get("tp", 1) * layout.get("pp", 1)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.pidfile = os.path.join(tmp, f"serve_{self.port}.pid")
        argv = ["serve", "--checkpoint", ckpt, "--port", str(self.port), "--model-name", "tiny", *flags]
        argv += ([f"--api-key={api_key}"] if api_key else []) + [f"parallel.{k}={v}" for k, v in layout.items()]
        self.results: list | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()
        self._wait_healthy()

    def _run(self, argv: list[str]) -> None:
        try:
            self.results = run_ranks(cli_rank, self.world, argv, self.pidfile, timeout=900)
        except BaseException as e:  # reported by stop() / _wait_healthy()
            self.error = e

    def _wait_healthy(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.error is not None:
                raise AssertionError(f"server failed to start: {self.error}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **{"timeout": 60, **kw})

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (``labels`` as written there, e.g. 'reason="disconnect"'); 0 when absent."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def sigterm(self) -> None:
        with open(self.pidfile) as f:
            os.kill(int(f.read()), signal.SIGTERM)

    def stop(self, timeout: float = 120.0) -> list:
        """SIGTERM to rank 0; every rank's exit code (all 0 after a clean drain)."""
        if self.thread.is_alive():
            self.sigterm()
            self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert not self.thread.is_alive(), "server did not exit after SIGTERM"
        return self.results


def engine_rank(rank: int, layout: dict[str, int], slots: int | None, rows: int) -> dict | None:
    """The engine without HTTP on a random tiny model: rank 0 drives scenarios from its thread, as the server does;
    every rank follows. Rank 0 returns what each scenario produced, next to the fixed-batch Generator's answer."""
    from gen_runs import prompts
    from megatron.core import parallel_state as ps
    from model_runs import make_cfg

    from mrlhf.generation.generate import GenerationConfig, Generator
    from mrlhf.generation.sampling import SamplingParams
    from mrlhf.models.roles import build_role
    from mrlhf.parallel.state import init_distributed
    from mrlhf.serving.engine import ServingEngine
    from mrlhf.serving.stage import StageRunner

    cfg = make_cfg(layout, ["model.flavour=llama"])
    init_distributed(cfg)
    model = build_role(cfg, "actor", 384, seed=3).eval()
    greedy = SamplingParams(temperature=0.0)
    ref = Generator(model, GenerationConfig(12, greedy, micro_batch_size=2), pad_id=0).generate(prompts(10)).tokens
    pp = ps.get_pipeline_model_parallel_world_size()
    slots = slots or pp
    runner = StageRunner(model, slots, rows, context=64, pad_id=0)
    engine = ServingEngine(slots, rows, pp, ps.get_pipeline_model_parallel_rank(), leader=rank == 0, context=64,
                           heartbeat_s=0.2)  # fmt: skip
    if rank != 0:
        engine.run(runner)
        return None
    thread = threading.Thread(target=engine.run, args=(runner,))
    thread.start()
    try:
        return {"ref": ref, **_engine_scenarios(engine, prompts(10), greedy)}
    finally:
        engine.shutdown()
        thread.join()


class _Collector:
    """Token events of submitted requests, by request id and choice."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[int, int], list[int]] = {}
        self.finish: dict[tuple[int, int], str] = {}
        self.cond = threading.Condition()

    def emit(self, ev) -> None:
        with self.cond:
            self.tokens.setdefault((ev.rid, ev.choice), []).append(ev.token)
            if ev.finish:
                self.finish[(ev.rid, ev.choice)] = ev.finish
            self.cond.notify_all()

    def wait(self, cond, timeout: float = 60.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: cond(self), timeout), "engine scenario timed out"


def _engine_scenarios(engine, ps_: list[list[int]], greedy) -> dict:
    from mrlhf.generation.sampling import SamplingParams
    from mrlhf.serving.engine import EngineRequest

    out: dict = {}
    col = _Collector()

    def req(p, n=1, max_tokens=12, sampling=greedy, stop=()):
        return EngineRequest(p, n, max_tokens, sampling, tuple(stop), 0, col.emit)

    # 1. more prompts than rows at once: they queue, join rows as others finish, and match the fixed batch
    rids = engine.submit([req(p) for p in ps_])
    col.wait(lambda c: all((r, 0) in c.finish for r in rids))
    out["queued"] = [col.tokens[(r, 0)] for r in rids]
    # 2. continuous batching: a second wave joins while the first is mid-generation
    first = engine.submit([req(p) for p in ps_[:3]])
    col.wait(lambda c: all(len(c.tokens.get((r, 0), [])) >= 3 for r in first))
    busy_when_joined = engine.busy_rows
    second = engine.submit([req(p) for p in ps_[3:6]])
    col.wait(lambda c: all((r, 0) in c.finish for r in first + second))
    out["joined_busy_rows"] = busy_when_joined
    out["waves"] = [col.tokens[(r, 0)] for r in first + second]
    # 3. cancel mid-generation frees the row; the tokens stop
    (long,) = engine.submit([req(ps_[0], max_tokens=40)])
    col.wait(lambda c: len(c.tokens.get((long, 0), [])) >= 3)
    engine.cancel(long)
    deadline = time.monotonic() + 30
    while engine.busy_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    out["after_cancel_busy"], out["cancelled_len"] = engine.busy_rows, len(col.tokens[(long, 0)])
    # 4. a seeded sampled request (n=3) gives the same choices alone and in a crowd
    sampled = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=11)
    (alone,) = engine.submit([req(ps_[1], n=3, sampling=sampled)])
    col.wait(lambda c: all((alone, j) in c.finish for j in range(3)))
    crowd = engine.submit([req(ps_[2]), req(ps_[1], n=3, sampling=sampled), req(ps_[3])])
    col.wait(lambda c: all((r, 0) in c.finish for r in crowd) and all((crowd[1], j) in c.finish for j in range(3)))
    out["sampled"] = [[col.tokens[(r, j)] for j in range(3)] for r in (alone, crowd[1])]
    # 5. a stop token ends one choice at that token
    stop = out["queued"][1][4]
    (stopped,) = engine.submit([req(ps_[1], stop=[stop])])
    col.wait(lambda c: (stopped, 0) in c.finish)
    out["stopped"], out["stop_finish"], out["stop"] = col.tokens[(stopped, 0)], col.finish[(stopped, 0)], stop
    out["ticks"] = engine.tick
    return out
