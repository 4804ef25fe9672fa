"""The demo task: gold judge, generators, and the shipped assets under mrlhf/assets/demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mrlhf.data.records import Turn
from mrlhf.data.templates import get_template
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.demo import ASSETS_DIR
from mrlhf.demo.judge import gold_response, judge_batch, score
from mrlhf.demo.task import (
    OPS,
    demonstration,
    make_problem,
    operand_pairs,
    parse_prompt,
    split_pools,
    wrong_response,
)

REPO = Path(__file__).resolve().parents[2]
DATA_FILES = ("sft_train", "sft_eval", "pref_train", "pref_eval", "prompts_train", "prompts_eval")
TRAIN_FILES = ("sft_train", "pref_train", "prompts_train")
EVAL_FILES = ("sft_eval", "pref_eval", "prompts_eval")


def load(name: str) -> list[dict]:
    with (ASSETS_DIR / f"{name}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- judge on hand-written cases ----


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("What is 47 + 38?", "47 + 38 = 85.", 1.0),
        ("What is 47 + 38?", "47 + 38 = 86.", 0.0),
        ("What is 47 + 38?", "85", 0.5),
        ("What is 47 + 38? Answer with just the number.", "85", 1.0),
        ("What is 47 + 38? Answer with just the number.", "47 + 38 = 85.", 0.5),
        ("What is 47 + 38? Answer with just the number.", "85.", 0.5),
        ("What is 47 + 38? Answer with just the number.", "58", 0.0),
        ("Add 47 and 38. Answer with the full equation.", "47 + 38 = 85.", 1.0),
        ("Add 47 and 38. Answer with the full equation.", "47 + 38 = 85", 0.5),
        ("Compute 47 plus 38.", "The answer is 85.", 0.5),
        ("Compute 47 plus 38.", "", 0.0),
        ("Subtract 19 from 64.", "64 - 19 = 45.", 1.0),
        ("Subtract 19 from 64.", "19 - 64 = -45.", 0.0),
        ("What is 64 minus 19? Answer with just the number.", "45", 1.0),
        ("Take 19 away from 64. Answer with just the number.", "46", 0.0),
        ("What is 7 times 8?", "7 * 8 = 56.", 1.0),
        ("Multiply 7 by 8. Answer with just the number.", "56", 1.0),
        ("What is the product of 7 and 8? Answer with just the number.", "54", 0.0),
        ("What is 7 * 8? Answer with the full equation.", "56", 0.5),
    ],
)
def test_score_cases(prompt: str, response: str, expected: float) -> None:
    assert score(prompt, response) == expected


def test_score_ignores_whitespace_eos_and_chat_template() -> None:
    prompt = "What is 47 + 38? Answer with just the number."
    for response in ("85\n", "  85  ", "85</s>", "85\n<|user|>\nWhat is 1 + 2?", "85<|endoftext|>garbage 99"):
        assert score(prompt, response) == 1.0, response
    rendered = get_template("plain").render_prompt([Turn("system", "Be brief."), Turn("user", prompt)])
    assert score(rendered, "85") == 1.0
    assert gold_response(rendered) == "85"


@pytest.mark.parametrize("prompt", ["What is 47 + ?", "What is 47 / 38?", "Hello", "", "What is 4 + 5? Be quick."])
def test_unparsable_prompt_raises_with_prompt(prompt: str) -> None:
    with pytest.raises(ValueError, match="not a demo task prompt"):
        score(prompt, "9")
    with pytest.raises(ValueError) as info:
        gold_response(prompt)
    assert repr(prompt) in str(info.value)


def test_gold_response_formats() -> None:
    assert gold_response("What is 47 + 38?") == "47 + 38 = 85."
    assert gold_response("Subtract 19 from 64. Answer with just the number.") == "45"
    assert gold_response("What is 7 times 8? Answer with the full equation.") == "7 * 8 = 56."


def test_judge_batch() -> None:
    prompts = ["What is 1 + 2?"] * 4
    out = judge_batch(prompts, ["1 + 2 = 3.", "3", "1 + 2 = 4.", "1 + 2 = 3. "])
    assert out == {"mean": 0.625, "accuracy": 0.5, "n": 4}
    with pytest.raises(ValueError):
        judge_batch(prompts, ["3"])


# ---- generators ----


def test_every_operator_and_template_round_trips() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        prompt, gold = make_problem(rng)
        problem = parse_prompt(prompt)
        seen.add((problem.op, problem.fmt))
        assert score(prompt, gold) == 1.0
        assert gold_response(prompt) == gold
        assert problem.result >= 0
    assert seen == {(op, fmt) for op in OPS for fmt in ("number", "equation")}


def test_wrong_and_demonstration_responses() -> None:
    rng = np.random.default_rng(1)
    demo_scores = []
    for _ in range(2000):
        prompt, gold = make_problem(rng)
        wrong = wrong_response(prompt, rng)
        assert wrong != gold and score(prompt, wrong) < 1.0, (prompt, wrong)
        demo_scores.append(score(prompt, demonstration(prompt, rng)))
    # Demonstrations always have the right number and sometimes the wrong format.
    assert set(demo_scores) == {0.5, 1.0}


def test_generators_are_deterministic() -> None:
    def run(seed: int) -> list:
        rng = np.random.default_rng(seed)
        pools = split_pools(rng, 0.05, 8)
        out = []
        for _ in range(300):
            prompt, gold = make_problem(rng, pools[0])
            out.append((prompt, gold, wrong_response(prompt, rng), demonstration(prompt, rng)))
        return [pools, out]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_split_pools_are_disjoint_and_cover_the_space() -> None:
    train, held = split_pools(np.random.default_rng(3), 0.05, 8)
    for op in OPS:
        assert not set(train[op]) & set(held[op])
        assert sorted(train[op] + held[op]) == sorted(operand_pairs(op))
    assert all((b, a) in train["*"] for a, b in held["*"])


# ---- shipped assets ----


def test_asset_files_exist_and_are_small() -> None:
    total = 0
    for name in [f"{n}.jsonl" for n in DATA_FILES] + ["tokenizer.model"]:
        path = ASSETS_DIR / name
        assert path.is_file(), path
        total += path.stat().st_size
    assert total < 3 * 1024 * 1024
    sizes = {name: len(load(name)) for name in DATA_FILES}
    assert sizes == {
        "sft_train": 4000,
        "sft_eval": 200,
        "pref_train": 3000,
        "pref_eval": 300,
        "prompts_train": 2000,
        "prompts_eval": 200,
    }


def test_gold_scores_one_on_eval_prompts() -> None:
    prompts = [r["prompt"] for name in EVAL_FILES for r in load(name)]
    assert judge_batch(prompts, [gold_response(p) for p in prompts])["accuracy"] == 1.0


def test_sft_responses_have_right_numbers() -> None:
    for name in ("sft_train", "sft_eval"):
        scores = [score(r["prompt"], r["response"]) for r in load(name)]
        assert min(scores) == 0.5 and max(scores) == 1.0


def test_pref_label_noise() -> None:
    def flipped_fraction(name: str) -> float:
        records = load(name)
        ties = 0
        flipped = 0
        for r in records:
            chosen, rejected = score(r["prompt"], r["chosen"]), score(r["prompt"], r["rejected"])
            ties += chosen == rejected
            flipped += chosen < rejected
        assert ties == 0, f"{name} has pairs the judge ties"
        return flipped / len(records)

    assert 0.07 <= flipped_fraction("pref_train") <= 0.13
    assert flipped_fraction("pref_eval") == 0.0


def test_eval_problems_disjoint_from_train() -> None:
    def problems(names: tuple[str, ...]) -> set[tuple[int, str, int]]:
        return {parse_prompt(r["prompt"]).key for name in names for r in load(name)}

    assert not problems(EVAL_FILES) & problems(TRAIN_FILES)
    assert len({r["prompt"] for r in load("prompts_eval")}) == 200


def test_tokenizer_round_trips_and_splits_digits() -> None:
    tok = Tokenizer.load(str(ASSETS_DIR / "tokenizer.model"))
    record = load("sft_eval")[0]
    text = get_template("plain").render_prompt([Turn("user", record["prompt"])]) + record["response"]
    assert tok.decode(tok.encode(text)) == text
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]


def test_script_regenerates_identical_bytes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_demo_assets.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for path in sorted(ASSETS_DIR.iterdir()):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
