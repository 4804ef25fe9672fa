"""`mrlhf serve`: every rank loads its stage of the actor; rank 0 serves HTTP and drives the engine, the others
follow its commands. Under torchrun all ranks get SIGTERM: the followers ignore it and stop when rank 0, having
drained its requests, broadcasts shutdown."""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass

from mrlhf.config import RunConfig
from mrlhf.errors import ConfigError


@dataclass
class ServeOptions:
    """`mrlhf serve` flags (the run config's dotted overrides set the layout, e.g. parallel.pp=2)."""

    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_running: int = 16  # sequence slots: KV-cache rows over all ring slots
    slots: int | None = None  # ring slots (default pp)
    max_queue: int = 64  # requests (prompts) waiting for a slot; more get 429
    max_context: int | None = None  # default model.max_position_embeddings
    max_tokens: int | None = None  # cap on max_tokens per request
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 60.0
    heartbeat_s: float = 5.0


def add_serve_arguments(p) -> None:
    """The `serve` subcommand's flags (cli.py builds the parser)."""
    d = ServeOptions()
    p.add_argument("--checkpoint", help="checkpoint directory (a save_dir or one step_N); its config is the base")
    p.add_argument("--config", help="YAML run file (used when the checkpoint has no config)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=os.environ.get("MRLHF_API_KEY"), help="required as 'Authorization: Bearer "
                   "KEY' on every route but /health (default: $MRLHF_API_KEY; none: open)")  # fmt: skip
    p.add_argument("--model-name", help="the model id clients pass (default: the run directory's name)")
    p.add_argument("--max-running", type=int, default=d.max_running, help="sequences generating at once")
    p.add_argument("--slots", type=int, help="ring slots (microbatches in flight; default pp)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting beyond that; more get 429")
    p.add_argument("--max-context", type=int, help="prompt + completion tokens (default model.max_position_embeddings)")
    p.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds per request")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout, help="SIGTERM: wait for in-flight requests")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.pp=2")


def options_from_args(args) -> ServeOptions:
    names = ServeOptions.__dataclass_fields__
    return ServeOptions(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _model_name(opts: ServeOptions, cfg: RunConfig) -> str:
    if opts.model_name:
        return opts.model_name
    path = os.path.normpath(os.path.abspath(opts.checkpoint or cfg.training.output_dir))
    while os.path.basename(path).startswith("step_") or os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    return os.path.basename(path) or "mrlhf"


def run_serve(cfg: RunConfig, opts: ServeOptions) -> int:
    """Serve until SIGTERM (rank 0) or rank 0's shutdown command (others). Returns the exit code."""
    from megatron.core import parallel_state as ps

    from mrlhf.data.templates import get_template
    from mrlhf.data.tokenizer import Tokenizer
    from mrlhf.parallel.state import destroy_distributed, init_distributed
    from mrlhf.serving.engine import ServingEngine
    from mrlhf.serving.protocol import ModelCard

    if min(opts.max_running, opts.max_queue, opts.slots or 1) < 1:
        raise ConfigError("mrlhf serve: --max-running, --max-queue and --slots must be >= 1")
    context = min(opts.max_context or cfg.model.max_position_embeddings, cfg.model.max_position_embeddings)
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    template = get_template(cfg.data.template)
    ctx = init_distributed(cfg, "generate")
    try:
        if ctx.layout.dp != 1:
            raise ConfigError(f"mrlhf serve runs one model replica: the world size must be tp*pp = "
                              f"{cfg.parallel.tp * cfg.parallel.pp}, got {ctx.layout.world_size}")  # fmt: skip
        pp = ps.get_pipeline_model_parallel_world_size()
        slots = opts.slots or pp
        rows = math.ceil(opts.max_running / slots)
        engine = ServingEngine(slots, rows, pp, ps.get_pipeline_model_parallel_rank(), leader=ctx.rank == 0,
                               context=context, max_queue=opts.max_queue, heartbeat_s=opts.heartbeat_s)  # fmt: skip
        if ctx.rank != 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains, then stops everyone
            engine.run(_runner(cfg, ctx, opts.checkpoint, tokenizer, slots, rows, context))
            return 0
        card = ModelCard(
            name=_model_name(opts, cfg), context=context, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
            bos_id=tokenizer.bos_id, encode=tokenizer.encode, template=template, max_choices=slots * rows,
            max_n=rows, max_prompts=opts.max_queue, max_tokens_cap=opts.max_tokens,
        )  # fmt: skip
        return _serve_rank0(cfg, ctx, opts, tokenizer, engine, card, slots, rows)
    finally:
        destroy_distributed()


def _runner(cfg, ctx, checkpoint, tokenizer, slots: int, rows: int, context: int):
    from mrlhf.generation.run import load_actor
    from mrlhf.serving.stage import StageRunner

    model = load_actor(cfg, ctx, checkpoint, tokenizer)
    return StageRunner(model, slots, rows, context, tokenizer.pad_id)


def _serve_rank0(cfg, ctx, opts: ServeOptions, tokenizer, engine, card, slots: int, rows: int) -> int:
    import uvicorn

    from mrlhf.serving.server import DrainingServer, ServerSettings, ServerState, build_app

    settings = ServerSettings(opts.api_key, opts.max_body_bytes, opts.request_timeout, opts.drain_timeout)
    state = ServerState()
    vocab = tokenizer.vocab_size

    def decode(ids) -> str:  # a padded model vocabulary can emit ids the tokenizer lacks: they read as nothing
        return tokenizer.decode([i for i in ids if 0 <= i < vocab])

    app = build_app(engine, card, decode, settings, state)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=int(opts.drain_timeout) + 1)  # fmt: skip
    server = DrainingServer(config, state, engine, opts.drain_timeout)
    errors: list[BaseException] = []

    def engine_thread() -> None:
        try:
            runner = _runner(cfg, ctx, opts.checkpoint, tokenizer, slots, rows, card.context)
            print(
                f"[mrlhf] serving '{card.name}' on http://{opts.host}:{opts.port} (tp={cfg.parallel.tp} "
                f"pp={cfg.parallel.pp}, {slots} ring slot(s) x {rows} rows, context {card.context}, KV cache "
                f"{runner.cache.nbytes / 2**20:.1f} MiB per stage)",
                flush=True,
            )
            engine.run(runner)
        except BaseException as e:  # the server sees engine.failure, answers 503 and exits
            errors.append(e)
            engine.failure = engine.failure or f"{type(e).__name__}: {e}"
            server.should_exit = True

    thread = threading.Thread(target=engine_thread, name="mrlhf-engine", daemon=True)
    thread.start()
    try:
        server.run()
    finally:  # also when uvicorn cannot bind: the loop must still tell the other ranks to stop
        engine.shutdown()
        thread.join()
    if errors:
        raise errors[0]
    return 0
