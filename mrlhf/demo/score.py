"""Score a generations jsonl (from `mrlhf generate`) with the demo task's gold judge.

    python -m mrlhf.demo.score runs/sft_demo/eval_generations.jsonl [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from mrlhf.demo.judge import judge_batch
from mrlhf.errors import DataError


def score_file(path: str) -> dict[str, float]:
    """Judge every record's ``response`` against its raw ``prompt`` (or, for a ``messages`` prompt, its last user
    turn): `mrlhf generate` keeps the input record's fields next to what it generated."""
    prompts, responses = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            record = json.loads(line)
            prompt = record.get("prompt")
            if prompt is None and isinstance(record.get("messages"), list):
                users = [m for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                prompt = users[-1].get("content") if users else None
            if not isinstance(prompt, str) or not isinstance(record.get("response"), str):
                raise DataError(path, n, "response" if isinstance(prompt, str) else "prompt", "missing or not a string")
            prompts.append(prompt)
            responses.append(record["response"])
    return judge_batch(prompts, responses)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generations")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    try:
        result = score_file(args.generations)
    except (DataError, ValueError) as e:
        print(f"mrlhf.demo.score: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"judge score {result['mean']:.3f}  exact accuracy {result['accuracy']:.3f}  over {result['n']} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
