"""Export one role of an mrlhf checkpoint (any TP/PP layout) as a Hugging Face model directory.

    python tools/convert_mrlhf_to_hf.py --ckpt DIR --out DIR [--role actor|reward|critic] [--max-shard-size 2GB]

LM roles become *ForCausalLM, reward/critic *ForSequenceClassification (num_labels=1). An ema_actor saved with the
actor goes to <out>/ema/. User errors print one line and exit with code 2; see docs/conversion.md.
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
    p.add_argument("--out", required=True, help="new HF model directory (must not exist, or be empty)")
    p.add_argument("--role", default=None, help="role to export (default: actor, else reward, else critic)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB, 1GiB")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="dtype of the written weights; auto keeps the checkpoint's precision",
    )
    p.add_argument(
        "--drop-head-bias",
        action="store_true",
        help="export a reward/critic whose head bias is nonzero without it (HF's score has no bias)",
    )
    args = p.parse_args(argv)
    # megatron (~5 s) loads here, once, before the ranks fork: after parsing, so --help and usage errors are instant
    from mrlhf.convert.export_hf import convert_mrlhf_to_hf

    try:
        s = convert_mrlhf_to_hf(args.ckpt, args.out, args.role, args.max_shard_size, args.dtype, args.drop_head_bias)
    except MrlhfError as e:
        print(f"convert_mrlhf_to_hf: error: {e}", file=sys.stderr)
        return e.exit_code
    for role, files in s["files"].items():
        print(f"wrote {s['out']}: '{role}' as {s['architecture']} ({s['dtype']}), {len(files)} weight file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
