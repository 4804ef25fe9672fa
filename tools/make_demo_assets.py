"""Regenerate the demo task data and tokenizer under mrlhf/assets/demo (byte-for-byte deterministic).

    .venv/bin/python tools/make_demo_assets.py [--out-dir DIR]

Train files draw prompts from the train pool and eval files from the held-out pool (see
`mrlhf.demo.task.split_pools`): no eval prompt string occurs in any train file, though every problem (`a op b`) does,
in other wordings and instructions. See docs/demo.md.
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
from mrlhf.demo.task import (  # noqa: E402
    FORMAT_KINDS,
    NUMBER_KINDS,
    WRONG_KINDS,
    WRONG_WEIGHTS,
    Pool,
    demonstration,
    distinct_prompts,
    make_problem,
    split_pools,
    wrong_response,
)

OUT_DIR = REPO / "mrlhf" / "assets" / "demo"
SEED = 20240607
# (template, instruction) combinations of each problem's 12 that are held out for the eval files.
HELD_OUT_PER_PROBLEM = 2
SIZES = {
    "sft_train": 4000,
    "sft_eval": 200,
    "pref_train": 20000,
    "pref_eval": 300,
    "prompts_train": 2000,
    "prompts_eval": 200,
}
PREF_LABEL_NOISE = 0.10
# A preference pair is gold vs the right number in the wrong form (the format lesson) this often; otherwise it is a
# right number vs a wrong one, where the right side is gold PREF_RIGHT_IS_GOLD of the time and else the right number in
# the wrong form (so that the number outranks the format).
PREF_FORMAT_PAIR_FRACTION = 0.45
PREF_RIGHT_IS_GOLD = 0.7
VOCAB_SIZE = 448


def sft_records(rng: np.random.Generator, pool: Pool, n: int) -> list[dict]:
    """`n` prompt/response records whose responses are (sloppy) simulated demonstrations."""
    records = []
    for _ in range(n):
        prompt, _gold = make_problem(rng, pool)
        records.append({"prompt": prompt, "response": demonstration(prompt, rng)})
    return records


def _kind(rng: np.random.Generator, kinds: tuple[str, ...]) -> str:
    """One of `kinds`, weighted as WRONG_WEIGHTS weights them."""
    weights = np.array([WRONG_WEIGHTS[WRONG_KINDS.index(k)] for k in kinds])
    return kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]


def pref_records(rng: np.random.Generator, pool: Pool, n: int, label_noise: float) -> list[dict]:
    """`n` judge-ordered pairs, then exactly round(label_noise * n) of them flipped."""
    records = []
    for _ in range(n):
        prompt, gold = make_problem(rng, pool)
        if rng.random() < PREF_FORMAT_PAIR_FRACTION:
            better, worse = gold, wrong_response(prompt, rng, _kind(rng, FORMAT_KINDS))
        else:
            right_form = rng.random() < PREF_RIGHT_IS_GOLD
            better = gold if right_form else wrong_response(prompt, rng, _kind(rng, FORMAT_KINDS))
            worse = wrong_response(prompt, rng, _kind(rng, NUMBER_KINDS))
        if not score(prompt, better) > score(prompt, worse):
            raise AssertionError(f"pair not ordered by the judge: {prompt!r} {better!r} {worse!r}")
        records.append({"prompt": prompt, "chosen": better, "rejected": worse})
    # Labellers disagree with the gold judge now and then: flip a fixed share, as noisy human labels would be.
    for i in rng.choice(n, size=round(label_noise * n), replace=False).tolist():
        r = records[i]
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    return records


def prompt_records(rng: np.random.Generator, pool: Pool, n: int) -> list[dict]:
    """`n` distinct prompts."""
    return [{"prompt": prompt} for prompt in distinct_prompts(rng, pool, n)]


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """Every data file's records, keyed by file stem; a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    train, held = split_pools(rng, HELD_OUT_PER_PROBLEM)
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
