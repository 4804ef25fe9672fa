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
    DEMO_IGNORES_NUMBER_INSTRUCTION,
    FORMAT_KINDS,
    NUMBER_KINDS,
    OPS,
    WRONG_KINDS,
    demonstration,
    distinct_prompts,
    instruction_quotas,
    make_problem,
    parse_prompt,
    prompt_probability,
    prompt_space,
    render_key,
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
        ("What is 7 * 8? Answer with the full equation.", "8 * 7 = 56.", 0.5),
        ("What is 0 + 0?", "0 + 0 = 0.", 1.0),
        ("Take 3 away from 7. Answer with just the number.", "4", 1.0),
        ("Take 3 away from 7.", "3 - 7 = 4.", 0.5),
        ("Take 3 away from 7.", "3 - 7 = -4.", 0.0),
        ("What is 5 minus 5? Answer with just the number.", "5 - 5 = 0.", 0.5),
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
        assert max(problem.a, problem.b) <= 9
    assert seen == {(op, fmt) for op in OPS for fmt in ("number", "equation")}


def test_prompt_space() -> None:
    space = prompt_space()
    # 100 sums, 55 differences, 64 products; 4 wordings x 3 instruction choices each.
    assert len(space) == (100 + 55 + 64) * 12
    prompts = [render_key(k) for k in space]
    assert len(set(prompts)) == len(prompts)
    assert all(parse_prompt(render_key(k)).key == k[:3] for k in space)
    assert sum(prompt_probability(k) for k in space) == pytest.approx(1.0)


def test_wrong_and_demonstration_responses() -> None:
    rng = np.random.default_rng(1)
    demo_scores = []
    for _ in range(2000):
        prompt, gold = make_problem(rng)
        wrong = wrong_response(prompt, rng)
        assert wrong != gold and score(prompt, wrong) < 1.0, (prompt, wrong)
        for kind in WRONG_KINDS:
            wrong = wrong_response(prompt, rng, kind)
            # Format kinds keep the right number; number kinds state a non-negative wrong one.
            assert score(prompt, wrong) == (0.5 if kind in FORMAT_KINDS else 0.0), (prompt, kind, wrong)
            assert "-" not in wrong.split("=")[-1]
        demo_scores.append(score(prompt, demonstration(prompt, rng)))
    # Demonstrations always have the right number and sometimes the wrong format.
    assert set(demo_scores) == {0.5, 1.0}
    assert set(FORMAT_KINDS) | set(NUMBER_KINDS) == set(WRONG_KINDS)
    with pytest.raises(ValueError, match="unknown wrong-response kind"):
        wrong_response("What is 1 + 2?", rng, "typo")


def test_generators_are_deterministic() -> None:
    def run(seed: int) -> list:
        rng = np.random.default_rng(seed)
        train, held = split_pools(rng, 2)
        out = []
        for _ in range(300):
            prompt, gold = make_problem(rng, train)
            out.append((prompt, gold, wrong_response(prompt, rng), demonstration(prompt, rng)))
        return [train, held, out, distinct_prompts(rng, held, 50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_split_pools_hold_out_prompt_strings_not_problems() -> None:
    rng = np.random.default_rng(3)
    train, held = split_pools(rng, 2)
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(prompt_space()) and len(train) + len(held) == len(prompt_space())
    problems = {k[:3] for k in prompt_space()}
    # Every problem keeps 10 of its 12 prompts in train and has exactly 2 held out.
    assert {k[:3] for k in held} == {k[:3] for k in train} == problems
    assert len(held) == 2 * len(problems)
    assert all(parse_prompt(make_problem(rng, held)[0]).key in problems for _ in range(100))


def test_distinct_prompts_keep_the_instruction_mix() -> None:
    assert instruction_quotas(200, [146, 146, 146]) == [100, 50, 50]
    assert instruction_quotas(2000, [730, 730, 730]) == [730, 635, 635]
    assert instruction_quotas(5, [10, 10, 10]) == [3, 1, 1]
    with pytest.raises(ValueError):
        instruction_quotas(31, [10, 10, 10])
    rng = np.random.default_rng(4)
    _train, held = split_pools(rng, 2)
    prompts = distinct_prompts(rng, held, 200)
    assert len(set(prompts)) == 200 and set(prompts) <= {render_key(k) for k in held}
    number = sum(parse_prompt(p).fmt == "number" for p in prompts)
    assert number == 100


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
        "pref_train": 20000,
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
    # Asked for just the number, demonstrators mostly write the full equation anyway (at the task's stated rate,
    # which must stay above one half: then the SFT policy's likeliest answer is the wrong format).
    number = [r for r in load("sft_train") if parse_prompt(r["prompt"]).fmt == "number"]
    share = sum("=" in r["response"] for r in number) / len(number)
    assert DEMO_IGNORES_NUMBER_INSTRUCTION > 0.5 and abs(share - DEMO_IGNORES_NUMBER_INSTRUCTION) <= 0.04, share


def test_pref_pairs_and_label_noise() -> None:
    def pair_scores(name: str) -> list[tuple[float, float]]:
        return [(score(r["prompt"], r["chosen"]), score(r["prompt"], r["rejected"])) for r in load(name)]

    train, held = pair_scores("pref_train"), pair_scores("pref_eval")
    assert not [p for p in train + held if p[0] == p[1]], "pairs the judge ties"
    assert sum(c < r for c, r in train) == 2000  # exactly 10% flipped
    assert all(c > r for c, r in held)
    # Both lessons are well represented: format (gold vs right number in the wrong form) and number (right vs wrong).
    for pairs in (train, held):
        format_pairs = sum(sorted(p) == [0.5, 1.0] for p in pairs) / len(pairs)
        assert 0.4 <= format_pairs <= 0.55
        assert all(min(p) == 0.0 for p in pairs if sorted(p) != [0.5, 1.0])


def test_eval_prompts_disjoint_from_train_but_problems_seen() -> None:
    def prompts(names: tuple[str, ...]) -> set[str]:
        return {r["prompt"] for name in names for r in load(name)}

    # Held out by prompt string: no eval prompt is a train prompt, but every eval problem is trained on.
    assert not prompts(EVAL_FILES) & prompts(TRAIN_FILES)
    train_problems = {parse_prompt(r["prompt"]).key for r in load("sft_train")}
    assert {parse_prompt(p).key for p in prompts(EVAL_FILES)} <= train_problems
    for name in ("prompts_train", "prompts_eval"):
        assert len(prompts((name,))) == len(load(name))
    assert sum(parse_prompt(r["prompt"]).fmt == "number" for r in load("prompts_eval")) == 100


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


def test_score_file_reads_generate_records(tmp_path: Path) -> None:
    """`mrlhf generate` keeps the input record: a raw `prompt`, or `messages` (judged on the last user turn)."""
    from mrlhf.demo.score import score_file
    from mrlhf.errors import DataError

    q = "What is 47 + 38? Answer with just the number."
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
    path = tmp_path / "gen.jsonl"
    path.write_text(
        json.dumps({"prompt": q, "index": 0, "response": "85"}) + "\n"
        + json.dumps({"messages": msgs, "index": 1, "response": "47 + 38 = 85."}) + "\n"
    )  # fmt: skip
    assert score_file(str(path)) == {"mean": 0.75, "accuracy": 0.5, "n": 2}  # the equation is half credit here
    path.write_text(json.dumps({"index": 0, "response": "85"}) + "\n")
    with pytest.raises(DataError, match="gen.jsonl:1: field 'prompt'"):
        score_file(str(path))
