"""``mrlhf <command> --config FILE [section.key=value ...]``: thin entry points over the trainers.

Run single-process with ``mrlhf sft ...``, under torchrun (``torchrun --nproc-per-node 4 -m mrlhf.cli sft ...``) or
as one srun task per GPU (``srun --ntasks-per-node 8 python -m mrlhf.cli sft ...``: the rank comes from Slurm's
variables, ``parallel/launch.py``; ``scripts/run_ppo_13b.sh``). ``mrlhf plan STAGE`` prints what a layout holds per GPU.
User errors (config, data, checkpoints, checkpoint I/O) print one line and exit with code 2; no traceback. Under
torchrun the layout is checked against WORLD_SIZE before any process group exists, and only rank 0 prints the line
(every rank raises the same error: checkpoint code agrees on rank-local failures first); every rank that reaches the
error exits 2, and torchrun itself stops (SIGTERM, -15 in its summary) a rank still starting when the first one exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from mrlhf.errors import MrlhfError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrlhf", description="Megatron-style 3D-parallel RLHF")
    sub = p.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning")
    sft.add_argument("--config", help="YAML run file (configs/sft_tiny.yaml)")
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4 parallel.tp=2")
    for name, text in (("rm", "reward-model training"), ("dpo", "direct preference optimisation"),
                       ("ppo", "PPO / GRPO / RLOO / REINFORCE++ against a reward model")):  # fmt: skip
        stage = sub.add_parser(name, help=text)
        stage.add_argument("--config", help=f"YAML run file (configs/{name}_demo.yaml)")
        stage.add_argument("overrides", nargs="*", help="dotted overrides")
    gen = sub.add_parser("generate", help="generate with an actor checkpoint, write jsonl")
    gen.add_argument("--checkpoint", help="checkpoint directory (a save_dir or one step_N); its config is the base")
    gen.add_argument("--prompts", required=True, help="prompt file ({prompt} or {messages} per record)")
    gen.add_argument("--out", required=True, help="output jsonl")
    gen.add_argument("--config", help="YAML run file (used when the checkpoint has no config)")
    gen.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.temperature=0 parallel.tp=2")
    from mrlhf.serving.run import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server on a checkpoint, at its TP/PP layout"))
    plot = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    plot.add_argument("run_dir", help="a run's output_dir (holds metrics.jsonl)")
    plot.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    plan = sub.add_parser("plan", help="bytes per GPU by role, kind and phase for a layout, before any GPU is used")
    plan_sub = plan.add_subparsers(dest="stage", required=True)
    for name in ("sft", "rm", "dpo", "ppo"):
        st = plan_sub.add_parser(name, help=f"plan a `mrlhf {name}` run")
        st.add_argument("--config", required=True, help="YAML run file (configs/ppo_13b.yaml)")
        st.add_argument("--world", type=int, help="number of processes (GPUs); default WORLD_SIZE, else tp*pp")
        st.add_argument("--json", action="store_true", help="every rank's numbers as JSON instead of the table")
        st.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what a run on this device holds")
        st.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4 ppo.offload_frozen=false")
    tok = sub.add_parser("tokenizer", help="tokenizer utilities")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    train = tok_sub.add_parser("train", help="train a sentencepiece model from text files")
    train.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    train.add_argument("--out", required=True, help="model prefix; writes <out>.model")
    train.add_argument("--vocab-size", type=int, default=512)
    return p


def _quiet_known_warnings() -> None:
    """Without TE/apex (CPU) megatron warns at import; torch.distributed.checkpoint warns about its own API."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="(torch.distributed.checkpoint|megatron)")


def _run(args: argparse.Namespace) -> int:
    _quiet_known_warnings()
    from mrlhf.parallel.launch import apply_launcher_env

    apply_launcher_env()  # an srun task (no torchrun) gets RANK/WORLD_SIZE/... from Slurm's variables, once
    if args.command == "tokenizer":
        from mrlhf.data.tokenizer import train_sentencepiece

        print(train_sentencepiece(args.input, args.out, args.vocab_size))
        return 0
    if args.command == "plot":
        from mrlhf.plot import plot_run

        for path in plot_run(args.run_dir, args.out):
            print(path)
        return 0
    from mrlhf.config import load_config

    if args.command in ("generate", "serve") and args.checkpoint and not args.config:
        cfg = _config_from_checkpoint(args.checkpoint, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)  # config errors surface before any distributed work
    if args.command == "plan":
        from mrlhf.plan import run_plan

        print(run_plan(cfg, args.stage, args.world, args.json, args.device))
        return 0
    stage = {"ppo": "ppo", "generate": "generate", "serve": "generate"}.get(args.command, "")
    cfg.validate_world(int(os.environ.get("WORLD_SIZE", "1")), stage)  # torchrun's layout, before any process group
    from mrlhf import integrity

    integrity.set_verify(cfg.checkpoint.verify_integrity)
    if args.command in ("sft", "rm", "dpo"):
        # data errors (file, line, field) surface before any process group exists; the trainer then maps the cache
        from mrlhf.trainers.common import STAGE_DATA, load_stage_data

        load_stage_data(cfg, *STAGE_DATA[args.command])
    elif args.command == "ppo":
        from mrlhf.trainers.ppo import load_ppo_data

        load_ppo_data(cfg)
    if args.command == "serve":  # sets up (and tears down) its own process group; rank 0 runs the HTTP server
        from mrlhf.serving.run import options_from_args, run_serve

        return run_serve(cfg, options_from_args(args))
    from mrlhf.parallel.state import destroy_distributed, init_distributed

    ctx = init_distributed(cfg, args.command)
    try:
        if args.command == "sft":
            from mrlhf.trainers.sft import train_sft

            train_sft(cfg, ctx)
        elif args.command == "rm":
            from mrlhf.trainers.rm import train_rm

            train_rm(cfg, ctx)
        elif args.command == "dpo":
            from mrlhf.trainers.dpo import train_dpo

            train_dpo(cfg, ctx)
        elif args.command == "ppo":
            from mrlhf.trainers.ppo import train_ppo

            train_ppo(cfg, ctx)
        elif args.command == "generate":
            from mrlhf.generation.run import run_generate

            run_generate(cfg, ctx, args.checkpoint, args.prompts, args.out)
    finally:
        destroy_distributed()
    return 0


def _config_from_checkpoint(path: str, overrides: list[str]):
    """The checkpoint's own config with the run's layout reset to one process, then the user's overrides."""
    from mrlhf.checkpoint import latest_checkpoint, read_meta
    from mrlhf.config import apply_overrides, config_from_dict

    meta = read_meta(latest_checkpoint(path) or path)
    data = meta["config"]
    data["parallel"] = {}
    data["checkpoint"] = {}
    return config_from_dict(apply_overrides(data, overrides))


ERROR_GRACE_S = 3.0
"""Under torchrun, how long a rank other than 0 waits for rank 0 to report the (same) error before reporting its own."""


def _error(message: str, code: int) -> int:
    """One ``mrlhf: error:`` line on stderr. Under torchrun rank 0 prints it; every other rank raised the same error
    and waits, since the first rank to exit makes torchrun stop the rest: rank 0 must get to print. A rank stopped
    that way still exits with ``code``; one whose error rank 0 did not share (still running after the grace time)
    reports it itself, naming its rank."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ:  # an srun task whose Slurm variables were refused: still only task 0 prints at once
        from mrlhf.parallel.launch import in_srun_task

        tasks = os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))
        if in_srun_task(os.environ) and os.environ["SLURM_PROCID"].isdigit() and tasks.isdigit():
            rank, world = int(os.environ["SLURM_PROCID"]), int(tasks)
    if rank == 0 or world == 1:
        print(f"mrlhf: error: {message}", file=sys.stderr, flush=True)
        return code
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    time.sleep(ERROR_GRACE_S)
    print(f"mrlhf: error: (rank {rank}) {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except MrlhfError as e:
        return _error(str(e), e.exit_code)
    except FileNotFoundError as e:
        return _error(f"file not found: {e.filename}", 2)
    except OSError as e:  # the environment, not the code: a full or read-only disk for metrics, configs, outputs
        return _error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""), 2)


if __name__ == "__main__":
    sys.exit(main())
