"""Regenerate the demo task data and tokenizer under mrlhf/assets/demo (byte-for-byte deterministic).

    .venv/bin/python tools/make_demo_assets.py [--out-dir DIR]

Train files draw problems from the train pool and eval files from the held-out pool (see
`mrlhf.demo.task.split_pools`), so no eval problem appears in any train file in any wording or format.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mrlhf.data.records import ROLES, Turn  # noqa: E402
from mrlhf.data.templates import get_template  # noqa: E402
from mrlhf.data.tokenizer import train_sentencepiece  # noqa: E402
from mrlhf.demo.judge import score  # noqa: E402
from mrlhf.demo.task import Pools, demonstration, make_problem, split_pools, wrong_response  # noqa: E402

OUT_DIR = REPO / "mrlhf" / "assets" / "demo"
SEED = 20240607
EVAL_FRACTION = 0.05
NUM_EVAL_MUL = 8
SIZES = {
    "sft_train": 4000,
    "sft_eval": 200,
    "pref_train": 3000,
    "pref_eval": 300,
    "prompts_train": 2000,
    "prompts_eval": 200,
}
PREF_LABEL_NOISE = 0.10
# A preference pair compares gold with a wrong response this often, else two wrong responses.
PREF_GOLD_FRACTION = 0.5
VOCAB_SIZE = 448


def sft_records(rng: np.random.Generator, pools: Pools, n: int) -> list[dict]:
    """`n` prompt/response records whose responses are (sloppy) simulated demonstrations."""
    records = []
    for _ in range(n):
        prompt, _gold = make_problem(rng, pools)
        records.append({"prompt": prompt, "response": demonstration(prompt, rng)})
    return records


def pref_records(rng: np.random.Generator, pools: Pools, n: int, label_noise: float) -> list[dict]:
    """`n` judge-labelled pairs (ties skipped), then exactly round(label_noise * n) of them flipped."""
    records = []
    while len(records) < n:
        prompt, gold = make_problem(rng, pools)
        first = gold if rng.random() < PREF_GOLD_FRACTION else wrong_response(prompt, rng)
        second = wrong_response(prompt, rng)
        s1, s2 = score(prompt, first), score(prompt, second)
        if s1 == s2:
            continue
        chosen, rejected = (first, second) if s1 > s2 else (second, first)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    # Labellers disagree with the gold judge now and then: flip a fixed share, as noisy human labels would be.
    for i in rng.choice(n, size=round(label_noise * n), replace=False).tolist():
        r = records[i]
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    return records


def prompt_records(rng: np.random.Generator, pools: Pools, n: int) -> list[dict]:
    """`n` distinct prompts."""
    seen: set[str] = set()
    records = []
    while len(records) < n:
        prompt, _gold = make_problem(rng, pools)
        if prompt not in seen:
            seen.add(prompt)
            records.append({"prompt": prompt})
    return records


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """Every data file's records, keyed by file stem; a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    train, held = split_pools(rng, EVAL_FRACTION, NUM_EVAL_MUL)
    return {
        "sft_train": sft_records(rng, train, SIZES["sft_train"]),
        "sft_eval": sft_records(rng, held, SIZES["sft_eval"]),
        "pref_train": pref_records(rng, train, SIZES["pref_train"], PREF_LABEL_NOISE),
        "pref_eval": pref_records(rng, held, SIZES["pref_eval"], 0.0),
        "prompts_train": prompt_records(rng, train, SIZES["prompts_train"]),
        "prompts_eval": prompt_records(rng, held, SIZES["prompts_eval"]),
    }


def corpus_lines(files: dict[str, list[dict]]) -> list[str]:
    """Tokenizer training text: every train prompt (rendered with the chat template) and response, line by line."""
    texts = []
    for name in ("sft_train", "pref_train", "prompts_train"):
        for r in files[name]:
            prompt = get_template("plain").render_prompt([Turn("user", r["prompt"])])
            texts += [prompt + r[key] for key in ("response", "chosen", "rejected") if key in r] or [prompt]
    # SentencePiece reads one sentence per line, so rendered prompts are split on their newlines.
    return [part for text in texts for part in text.split("\n") if part]


def main() -> None:
    """Write the six JSONL files and tokenizer.model into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    files = build()
    for name, records in files.items():
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        text_path = Path(tmp) / "corpus.txt"
        text_path.write_text("\n".join(corpus_lines(files)) + "\n", encoding="utf-8")
        model_path = train_sentencepiece(
            [str(text_path)],
            str(Path(tmp) / "tokenizer"),
            VOCAB_SIZE,
            user_defined_symbols=[f"<|{role}|>" for role in ROLES],
        )
        (out_dir / "tokenizer.model").write_bytes(Path(model_path).read_bytes())
    for name in [*files, "tokenizer"]:
        path = out_dir / (f"{name}.jsonl" if name in files else "tokenizer.model")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
