"""Print an mrlhf checkpoint's step, layout, roles, tokenizer, origin, config and every tensor's shape and dtype.

    python tools/inspect_checkpoint.py DIR

Verifies every file against the checkpoint's integrity manifest (sha256, in parallel; --no-verify: sizes only), then
reads meta.json and dist_checkpointing metadata (no model is built). Exit code 2 on a bad path or a damaged file.
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
    p.add_argument("ckpt", help="checkpoint: a save_dir (with 'latest') or one step_N directory")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not their sha256")
    args = p.parse_args(argv)
    from mrlhf import integrity
    from mrlhf.convert.reshard import inspect_checkpoint

    integrity.set_verify(not args.no_verify)

    try:
        print(inspect_checkpoint(args.ckpt))
    except MrlhfError as e:
        print(f"inspect_checkpoint: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
