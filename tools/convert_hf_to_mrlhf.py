"""Convert a Hugging Face model directory into an mrlhf checkpoint at a chosen TP x PP layout.

    python tools/convert_hf_to_mrlhf.py --hf DIR --out DIR --tp 2 --pp 2 [--role actor|reward|critic] [--dtype bf16]

Forks tp*pp ranks over gloo on this machine (CPU). User errors print one line and exit with code 2; a failed
conversion leaves no output directory. See docs/conversion.md.
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
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("--out", required=True, help="new checkpoint directory (must not exist, or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the checkpoint")
    p.add_argument(
        "--role",
        choices=["actor", "reference", "reward", "critic"],
        default=None,
        help="default: actor for *ForCausalLM, reward for *ForSequenceClassification, critic for a v_head",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="checkpoint precision; auto keeps bf16 weights bf16 and stores everything else as fp32",
    )
    args = p.parse_args(argv)
    # megatron (~5 s) loads here, once, before the ranks fork: after parsing, so --help and usage errors are instant
    from mrlhf.convert.import_hf import convert_hf_to_mrlhf

    try:
        s = convert_hf_to_mrlhf(args.hf, args.out, args.tp, args.pp, args.role, args.dtype)
    except MrlhfError as e:
        print(f"convert_hf_to_mrlhf: error: {e}", file=sys.stderr)
        return e.exit_code
    for note in s["notes"]:
        print(f"convert_hf_to_mrlhf: note: {note}", file=sys.stderr)
    tok = f"{len(s['tokenizer_files'])} tokenizer file(s), hash {s['tokenizer_hash'][:12] or '-'}"
    print(
        f"wrote {s['out']}: {s['architecture']} as '{s['role']}' at tp={s['tp']} pp={s['pp']} ({s['precision']}), {tok}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
