"""``mrlhf <command> --config FILE [section.key=value ...]``: thin entry points over the trainers.

Run single-process with ``mrlhf sft ...`` or under torchrun (``torchrun --nproc-per-node 4 -m mrlhf.cli sft ...``).
User errors (config, data, checkpoints) print one line and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from mrlhf.errors import MrlhfError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mrlhf", description="Megatron-style 3D-parallel RLHF")
    sub = p.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning")
    sft.add_argument("--config", help="YAML run file (configs/sft_tiny.yaml)")
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4 parallel.tp=2")
    tok = sub.add_parser("tokenizer", help="tokenizer utilities")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    train = tok_sub.add_parser("train", help="train a sentencepiece model from text files")
    train.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    train.add_argument("--out", required=True, help="model prefix; writes <out>.model")
    train.add_argument("--vocab-size", type=int, default=512)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "tokenizer":
        from mrlhf.data.tokenizer import train_sentencepiece

        print(train_sentencepiece(args.input, args.out, args.vocab_size))
        return 0
    from mrlhf.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before any distributed work
    warnings.filterwarnings("ignore", module="megatron")
    from mrlhf.parallel.state import destroy_distributed, init_distributed

    ctx = init_distributed(cfg)
    try:
        if args.command == "sft":
            from mrlhf.trainers.sft import train_sft

            train_sft(cfg, ctx)
    finally:
        destroy_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except MrlhfError as e:
        print(f"mrlhf: error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"mrlhf: error: file not found: {e.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
