"""``ppo.reward_function`` on one CPU process: loading, the text handed to the function, the prompt-row columns, and
every way an answer can be wrong. Expectations are written out by hand."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mrlhf.config import load_config
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.demo import judge
from mrlhf.errors import ConfigError
from mrlhf.rl.experience import build_rollout
from mrlhf.rl.reward_fn import RewardFunction, RewardFunctionError, columns_of, load, texts

ROOT = Path(__file__).resolve().parents[2]
PPO_YAML = str(ROOT / "configs" / "ppo_demo.yaml")
TOKENIZER = str(ROOT / "mrlhf" / "assets" / "demo" / "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(TOKENIZER)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module 'user_rewards' on sys.path with the functions the tests call."""
    (tmp_path / "user_rewards.py").write_text(
        textwrap.dedent(
            """
            import torch

            NOT_CALLABLE = 3

            def length(prompts, completions, **kwargs):
                return [float(len(r)) for r in completions]

            # TRL's documented examples take only what they use, by keyword
            def reward_len(completions, **kwargs):
                return [-abs(4 - len(c)) for c in completions]

            def accuracy(completions, answer, **kwargs):
                return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

            def even_ids(completion_ids, **kwargs):
                return [sum(t % 2 == 0 for t in ids) for ids in completion_ids]

            def short(prompts, completions, **kwargs):
                return [1.0] * (len(completions) - 1)

            def words(prompts, completions, **kwargs):
                return ["good"] * len(completions)

            def booleans(prompts, completions, **kwargs):
                return [True, False][: len(completions)]

            def scalar(prompts, completions, **kwargs):
                return 1.0

            def tensor(prompts, completions, **kwargs):
                return torch.arange(len(completions), dtype=torch.float64)

            def nan_first(prompts, completions, **kwargs):
                return [float("nan")] + [1.0] * (len(completions) - 1)

            def none_first(prompts, completions, **kwargs):
                return [None] + [1.0] * (len(completions) - 1)

            def broken(prompts, completions, **kwargs):
                return [1 / 0 for _ in completions]

            class Scorers:
                @staticmethod
                def answer(prompts, completions, answer, **kwargs):
                    return [float(a) for a in answer]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards"
    sys.modules.pop("user_rewards", None)


# ---- config and loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["mrlhf.demo.judge", "mrlhf.demo.judge:reward:x", ":reward", "mrlhf demo:reward", "a:b c"]
)
def test_malformed_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match=r"ppo.reward_function must be 'module:callable'"):
        load_config(PPO_YAML, [f"ppo.reward_function={spec}"])


def test_reward_function_and_reward_model_are_exclusive():
    with pytest.raises(ConfigError, match="both set"):
        load_config(PPO_YAML, ["ppo.reward_function=mrlhf.demo.judge:reward", "ppo.reward_load_dir=runs/rm"])


def test_load_names_what_is_missing(user_module):
    assert load("mrlhf.demo.judge:reward") is judge.reward
    assert load(f"{user_module}:Scorers.answer")([], [], answer=[]) == []
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        load("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match=f"module '{user_module}' has no attribute 'missing'"):
        load(f"{user_module}:missing")
    with pytest.raises(ConfigError, match="'NOT_CALLABLE' is a int, not a function"):
        load(f"{user_module}:NOT_CALLABLE")


# ---- what the function is given -----------------------------------------------------------------------------------


def _rollout(tok, prompts: list[str], responses: list[str], ended: list[bool]):
    p_ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    r_ids = [tok.encode(r) + ([tok.eos_id] if e else []) for r, e in zip(responses, ended)]
    width = max(len(p) + len(r) for p, r in zip(p_ids, r_ids)) + 3  # right padding too
    return build_rollout(
        p_ids, r_ids, [[-0.5] * len(r) for r in r_ids], [not e for e in ended], list(range(len(prompts))),
        [7, 3], width, tok.pad_id, torch.device("cpu"),
    )  # fmt: skip


def test_texts_are_the_rendered_prompt_and_the_response_without_eos(tok):
    prompts = ["<|user|>\nWhat is 8 minus 3?\n<|assistant|>\n",
               "<|user|>\nWhat is the sum of 8 and 2? Answer with just the number.\n<|assistant|>\n"]  # fmt: skip
    exp = _rollout(tok, prompts, ["8 - 3 = 5.", "10"], ended=[True, False])
    got_prompts, got_responses, got_ids = texts(exp, tok, tok.eos_id)
    assert got_ids == [tok.encode("8 - 3 = 5."), tok.encode("10")]  # token ids without EOS
    assert got_prompts == [tok.decode(tok.encode(p)) for p in prompts]
    assert got_responses == ["8 - 3 = 5.", "10"]  # the first ended with EOS (dropped), the second was truncated
    assert [judge.score(p, r) for p, r in zip(got_prompts, got_responses)] == [1.0, 1.0]


def test_ids_beyond_the_tokenizer_are_left_out_of_the_text(tok):
    """A model wider than its tokenizer can sample ids the tokenizer cannot decode (sentencepiece raises)."""
    exp = _rollout(tok, ["a"], ["xy"], ended=[True])
    exp.tokens[0, 1 + len(tok.encode("a"))] = tok.vocab_size + 5  # the first response token: past the last piece
    prompts, responses, _ = texts(exp, tok, tok.eos_id)
    assert responses == [tok.decode(tok.encode("xy")[1:])] and prompts == [tok.decode(tok.encode("a"))]


class Rows:
    """A prompt dataset stand-in: ``columns(i)`` of the prompt rows."""

    def __init__(self, rows: dict[int, dict]) -> None:
        self.rows = rows

    def columns(self, i: int) -> dict:
        return self.rows.get(i, {})


def test_columns_are_one_list_per_field_with_none_where_a_row_lacks_it():
    rows = Rows({0: {"answer": 5, "source": "gsm"}, 1: {"answer": 7}, 2: {}})
    assert columns_of(rows, [1, 0, 2, 0]) == {"answer": [7, 5, None, 5], "source": [None, "gsm", None, "gsm"]}
    assert columns_of(Rows({0: {}}), [0, 0]) == {}


# ---- what the function answers ------------------------------------------------------------------------------------


def _fn(spec: str, tok, rows=None) -> RewardFunction:
    return RewardFunction(spec, tok, rows or Rows({}), tok.eos_id)


def test_scores_come_back_as_float32_in_row_order(tok, user_module):
    exp = _rollout(tok, ["a b", "c"], ["xyz", "hello"], ended=[True, True])
    assert _fn(f"{user_module}:length", tok).score(exp).tolist() == [3.0, 5.0]
    assert _fn(f"{user_module}:tensor", tok).score(exp).tolist() == [0.0, 1.0]
    fn = _fn(f"{user_module}:Scorers.answer", tok, Rows({7: {"answer": 2.5}, 3: {"answer": -1}}))
    out = fn.score(exp)  # prompt_index of the rows: 7, 3
    assert out.dtype == torch.float32 and out.tolist() == [2.5, -1.0]
    assert fn.seconds > 0


@pytest.mark.parametrize("name", ["nan_first", "none_first"])
def test_nan_or_none_is_an_answer_not_an_error(tok, user_module, name):
    exp = _rollout(tok, ["a", "b"], ["x", "y"], ended=[True, True])
    out = _fn(f"{user_module}:{name}", tok).score(exp)
    assert math.isnan(out[0]) and out[1] == 1.0  # shape() drops the sample, as for a reward model's NaN


def test_trl_reward_functions_work_unchanged(tok, user_module):
    """Called by keyword as TRL's GRPOTrainer calls them: a function may take just completions, a column, or ids."""
    exp = _rollout(tok, ["a", "b"], ["12", "hello"], ended=[True, False])
    assert _fn(f"{user_module}:reward_len", tok).score(exp).tolist() == [-2.0, -1.0]
    rows = Rows({7: {"answer": 12}, 3: {"answer": 5}})
    assert _fn(f"{user_module}:accuracy", tok, rows).score(exp).tolist() == [1.0, 0.0]
    want = [float(sum(t % 2 == 0 for t in tok.encode(c))) for c in ("12", "hello")]
    assert _fn(f"{user_module}:even_ids", tok).score(exp).tolist() == want
    assert _fn(f"{user_module}:booleans", tok).score(exp).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "name, message",
    [
        ("short", r"returned 1 scores for 2 responses"),
        ("words", r"score 0 is 'good' \(str\), not a number \(response 'x'\)"),
        ("scalar", r"returned a float, not a list of 2 scores"),
        ("broken", r"raised ZeroDivisionError: division by zero \(at .*user_rewards.py:\d+; first response 'x'"),
    ],
)
def test_a_wrong_answer_is_one_line_naming_the_function(tok, user_module, name, message):
    exp = _rollout(tok, ["a", "b"], ["x", "y"], ended=[True, True])
    with pytest.raises(RewardFunctionError, match=rf"^ppo.reward_function={user_module}:{name}.*{message}") as e:
        _fn(f"{user_module}:{name}", tok).score(exp)
    assert "\n" not in str(e.value)


def test_a_column_named_like_an_argument_is_refused(tok, user_module):
    exp = _rollout(tok, ["a", "b"], ["x", "y"], ended=[True, True])
    for name in ("prompts", "completions", "completion_ids"):
        with pytest.raises(RewardFunctionError, match=f"field named '{name}'.*rename it in the data"):
            _fn(f"{user_module}:length", tok, Rows({7: {name: 1}, 3: {}})).score(exp)


# ---- several functions ----------------------------------------------------------------------------------------------


def test_several_functions_parse_and_their_weights_are_checked():
    cfg = load_config(PPO_YAML, ["ppo.reward_function=mrlhf.demo.judge:reward, mrlhf.demo.judge:score_all"])
    assert cfg.ppo.reward_functions == ["mrlhf.demo.judge:reward", "mrlhf.demo.judge:score_all"]
    with pytest.raises(ConfigError, match=r"ppo.reward_weights must be 2 finite numbers.*got \[1.0\]"):
        load_config(PPO_YAML, ["ppo.reward_function=a:b,c:d", "ppo.reward_weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"got 'c d' in 'a:b,c d'"):
        load_config(PPO_YAML, ["ppo.reward_function=a:b,c d"])


def test_several_functions_are_summed_over_those_that_scored(tok, user_module):
    """length (3, 5) with weight 2 and none_first (None, 1) with weight 0.5: row 0 = 2 * 3 (the None is left out),
    row 1 = 2 * 5 + 0.5 * 1 = 10.5; two None-first functions leave row 0 with no score at all: NaN (dropped)."""
    exp = _rollout(tok, ["a b", "c"], ["xyz", "hello"], ended=[True, True])
    fn = RewardFunction([f"{user_module}:length", f"{user_module}:none_first"], tok, Rows({}), tok.eos_id, [2.0, 0.5])
    assert fn.score(exp).tolist() == [6.0, 10.5]
    assert fn.parts == [(8.0, 2.0), (1.0, 1.0)] and fn.names == ["length", "none_first"]
    both = RewardFunction([f"{user_module}:none_first"] * 2, tok, Rows({}), tok.eos_id)
    out = both.score(exp)
    assert math.isnan(out[0]) and out[1] == 2.0 and both.names == ["none_first_0", "none_first_1"]


def test_the_failing_entry_is_the_one_named(tok, user_module):
    exp = _rollout(tok, ["a", "b"], ["x", "y"], ended=[True, True])
    fn = RewardFunction([f"{user_module}:length", f"{user_module}:broken"], tok, Rows({}), tok.eos_id)
    with pytest.raises(RewardFunctionError, match=rf"^ppo.reward_function={user_module}:broken raised"):
        fn.score(exp)
