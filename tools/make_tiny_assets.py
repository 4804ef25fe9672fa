"""Regenerate the tiny arithmetic SFT data and tokenizer under mrlhf/assets/tiny (deterministic)."""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mrlhf.data.formats import read_dataset  # noqa: E402
from mrlhf.data.records import ROLES  # noqa: E402
from mrlhf.data.templates import get_template  # noqa: E402
from mrlhf.data.tokenizer import train_sentencepiece  # noqa: E402

OUT_DIR = REPO / "mrlhf" / "assets" / "tiny"
SEED = 1234
NUM_TRAIN = 2000
NUM_EVAL = 200
VOCAB_SIZE = 384
MESSAGES_FRACTION = 0.2
PROMPTS = {
    "+": ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"],
    "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "What is {a} minus {b}?"],
}
SYSTEM_PROMPTS = ["You are a careful calculator.", "Answer with the full equation."]


def all_problems() -> list[tuple[int, str, int]]:
    """Every (a, op, b) with operands 0-99; subtraction keeps a >= b so answers stay non-negative."""
    problems = [(a, "+", b) for a in range(100) for b in range(100)]
    problems += [(a, "-", b) for a in range(100) for b in range(a + 1)]
    return problems


def make_line(rng: random.Random, a: int, op: str, b: int) -> dict:
    """One JSONL record for a problem, in the prompt/response or (sometimes) the messages schema."""
    prompt = rng.choice(PROMPTS[op]).format(a=a, b=b)
    response = f"{a} {op} {b} = {a + b if op == '+' else a - b}."
    if rng.random() >= MESSAGES_FRACTION:
        return {"prompt": prompt, "response": response}
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"messages": messages}


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records one JSON object per line."""
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    """Write sft_train.jsonl, sft_eval.jsonl (disjoint problems) and tokenizer.model into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rng = random.Random(SEED)
    problems = rng.sample(all_problems(), NUM_TRAIN + NUM_EVAL)
    train_path, eval_path = out_dir / "sft_train.jsonl", out_dir / "sft_eval.jsonl"
    write_jsonl(train_path, [make_line(rng, *p) for p in problems[:NUM_TRAIN]])
    write_jsonl(eval_path, [make_line(rng, *p) for p in problems[NUM_TRAIN:]])

    # SentencePiece reads one sentence per line, so rendered prompts are split on their newlines.
    plain = get_template("plain")
    samples = read_dataset(str(train_path), "sft").samples
    lines = [part for r in samples for part in (plain.render_prompt(list(r.prompt)) + r.response).split("\n") if part]
    with tempfile.TemporaryDirectory() as tmp:
        text_path = Path(tmp) / "corpus.txt"
        text_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        model_path = train_sentencepiece(
            [str(text_path)],
            str(Path(tmp) / "tokenizer"),
            VOCAB_SIZE,
            user_defined_symbols=[f"<|{role}|>" for role in ROLES],
        )
        (out_dir / "tokenizer.model").write_bytes(Path(model_path).read_bytes())
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "tokenizer.model"):
        print(f"wrote {out_dir / name} ({(out_dir / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
