"""Peak host memory of the conversion tools against the size of the model they convert.

For GPT-2 and LLaMA shaped models of 8 and 16 layers (random weights written layer by layer, fp32), runs each tool
as a separate command and reports its peak RSS (the largest of the tool and every process it forks, from
``getrusage(RUSAGE_CHILDREN)`` in a fresh probe interpreter):

    import   tools/convert_hf_to_mrlhf.py  --tp 1 --pp 1     (HF -> mrlhf, one rank)
    export   tools/convert_mrlhf_to_hf.py                    (mrlhf -> HF, one process)
    reshard  tools/reshard.py --tp 2 --pp 2                  (mrlhf TP1 -> TP2xPP2, four ranks)

The reference, measured in the same run, is ``transformers``' own load + ``save_pretrained`` of the same directory
(what HF-side conversion scripts do): any tool that materialises the model grows its peak by at least the weights
added; a streaming tool grows it by at most about one layer. The ratio printed is (peak growth from 8 to 16 layers) / (weights added).

    .venv/bin/python benchmarks/conversion_memory.py [--hidden 512] [--models gpt2 llama]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROBE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stderr.write(r.stderr[-3000:]) if r.returncode else None; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)"
)


HF_COPY = (
    "import sys, transformers; "
    "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"
)


def peak_rss(cmd: list[str]) -> int:
    """Peak RSS in bytes of ``cmd`` and everything it starts."""
    out = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, check=True)
    kib = int(out.stdout.strip().splitlines()[-1])
    if kib < 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return kib * 1024


def tool_commands(work: str, n: int) -> dict[str, list[str]]:
    py = sys.executable
    tools = os.path.join(ROOT, "tools")
    hf, ckpt = os.path.join(work, f"hf{n}"), os.path.join(work, f"ckpt{n}")
    return {
        "import": [py, f"{tools}/convert_hf_to_mrlhf.py", "--hf", hf, "--out", ckpt],
        "export": [py, f"{tools}/convert_mrlhf_to_hf.py", "--ckpt", ckpt, "--out", os.path.join(work, f"back{n}")],
        "reshard": [py, f"{tools}/reshard.py", "--ckpt", ckpt, "--out", os.path.join(work, f"rs{n}"), "--tp", "2",
                    "--pp", "2"],
        # reference: what HF-side tools do -- load the whole model, save it again
        "HF load+save": [py, "-c", HF_COPY, hf, os.path.join(work, f"hfcopy{n}")],
    }  # fmt: skip


def measure(model_type: str, hidden: int, layers: tuple[int, int], work: str) -> dict[str, dict[int, int]]:
    """{tool: {layers: peak bytes}} plus {'weights': {layers: bytes}}."""
    from mrlhf.convert.tiny import write_random_hf

    out: dict[str, dict[int, int]] = {"weights": {}}
    for n in layers:
        out["weights"][n] = 4 * write_random_hf(os.path.join(work, f"hf{n}"), model_type, n, hidden=hidden)
    for n in layers:  # tools in order: export and reshard read what import wrote
        for tool, cmd in tool_commands(work, n).items():
            out.setdefault(tool, {})[n] = peak_rss(cmd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--layers", nargs=2, type=int, default=[8, 16])
    args = ap.parse_args()
    import torch

    print(f"# conversion memory benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()}  cores={os.cpu_count()}"
          f"  torch {torch.__version__}  hidden {args.hidden}, ffn 4x, fp32")  # fmt: skip
    lo, hi = args.layers
    mib = 2**20
    print(f"{'model':>6} {'tool':>13} {f'weights {lo}L':>11} {f'weights {hi}L':>11} {f'peak {lo}L':>9} "
          f"{f'peak {hi}L':>9} {'+weights':>9} {'+peak':>7} {'ratio':>6}")  # fmt: skip
    for model_type in args.models:
        with tempfile.TemporaryDirectory() as work:
            res = measure(model_type, args.hidden, (lo, hi), work)
        w = res.pop("weights")
        for tool, peaks in res.items():
            grew, added = peaks[hi] - peaks[lo], w[hi] - w[lo]
            print(f"{model_type:>6} {tool:>13} {w[lo] / mib:>9.0f}Mi {w[hi] / mib:>9.0f}Mi {peaks[lo] / mib:>7.0f}Mi "
                  f"{peaks[hi] / mib:>7.0f}Mi {added / mib:>7.0f}Mi {grew / mib:>5.0f}Mi {grew / added:>6.2f}")  # fmt: skip
    print("ratio = peak growth / weights added; a tool holding the model is >= 1.00, a streaming one ~0")


if __name__ == "__main__":
    main()
