"""Rewrite an mrlhf checkpoint's model weights (every role) at another TP x PP layout.

    python tools/reshard.py --ckpt DIR --out DIR --tp 1 --pp 1

Optimizer state is layout-specific and is not carried: use the result with checkpoint.load_dir, not to resume.
User errors print one line and exit with code 2; see docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

from mrlhf.errors import MrlhfError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint: a save_dir (with 'latest') or one step_N directory")
    p.add_argument("--out", required=True, help="new checkpoint directory (must not exist, or be empty)")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    args = p.parse_args(argv)
    # megatron (~5 s) loads here, once, before the ranks fork: after parsing, so --help and usage errors are instant
    from mrlhf.convert.reshard import reshard_checkpoint

    try:
        s = reshard_checkpoint(args.ckpt, args.out, args.tp, args.pp)
    except MrlhfError as e:
        print(f"reshard: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {s['out']}: {', '.join(s['roles'])} from {s['from']} to {s['to']} (weights only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
