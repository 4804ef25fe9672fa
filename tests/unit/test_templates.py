"""Chat templates: hand-written expected renderings, response suffixes, turn validation, registry errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import mrlhf
from mrlhf.data.records import Turn
from mrlhf.data.templates import TEMPLATES, get_template
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.errors import MrlhfError

TINY_MODEL = Path(mrlhf.__file__).parent / "assets" / "tiny" / "tokenizer.model"
HF_DIR = Path(__file__).parents[1] / "fixtures" / "hf_tokenizer"

ONE_TURN = [Turn("user", "What is 1 + 2?")]
MULTI_TURN = [
    Turn("system", "Be brief."),
    Turn("user", "What is 1 + 2?"),
    Turn("assistant", "3."),
    Turn("user", "And 3 + 4?"),
]


def test_registry_names() -> None:
    assert sorted(TEMPLATES) == ["chatml", "llama2", "plain"]
    assert all(get_template(name).name == name for name in TEMPLATES)


def test_unknown_template_lists_names() -> None:
    with pytest.raises(MrlhfError, match="unknown chat template 'vicuna'; choose one of: chatml, llama2, plain"):
        get_template("vicuna")


def test_templates_are_frozen() -> None:
    with pytest.raises(AttributeError):
        get_template("plain").name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name, one_turn, multi_turn",
    [
        (
            "plain",
            "<|user|>\nWhat is 1 + 2?\n<|assistant|>\n",
            "<|system|>\nBe brief.\n<|user|>\nWhat is 1 + 2?\n<|assistant|>\n3.\n<|user|>\nAnd 3 + 4?\n<|assistant|>\n",
        ),
        (
            "llama2",
            "[INST] What is 1 + 2? [/INST] ",
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 1 + 2? [/INST] 3. [INST] And 3 + 4? [/INST] ",
        ),
        (
            "chatml",
            "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
            "<|im_start|>assistant\n3.<|im_end|>\n<|im_start|>user\nAnd 3 + 4?<|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
)
def test_render_prompt(name: str, one_turn: str, multi_turn: str) -> None:
    template = get_template(name)
    assert template.render_prompt(ONE_TURN) == one_turn
    assert template.render_prompt(MULTI_TURN) == multi_turn
    assert template.render_prompt(tuple(MULTI_TURN)) == multi_turn


def test_llama2_system_with_single_user_turn() -> None:
    turns = [Turn("system", "Be brief."), Turn("user", "Hi")]
    assert get_template("llama2").render_prompt(turns) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] "


def test_contents_are_inserted_verbatim() -> None:
    turns = [Turn("user", "  {role} {0} braces  ")]
    assert get_template("plain").render_prompt(turns) == "<|user|>\n  {role} {0} braces  \n<|assistant|>\n"
    assert get_template("llama2").render_prompt(turns) == "[INST]   {role} {0} braces   [/INST] "


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_invalid_role(name: str) -> None:
    with pytest.raises(MrlhfError, match="turn 1: role 'bot' is not one of system, user, assistant"):
        get_template(name).render_prompt([Turn("user", "hi"), Turn("bot", "hello")])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_no_turns(name: str) -> None:
    with pytest.raises(MrlhfError, match="at least one turn"):
        get_template(name).render_prompt([])


@pytest.mark.parametrize(
    "roles, message",
    [
        (["user", "user"], "turn 1 is 'user', expected 'assistant'"),
        (["assistant", "user"], "turn 0 is 'assistant', expected 'user'"),
        (["system", "assistant"], "turn 1 is 'assistant', expected 'user'"),
        (["system", "user", "system", "user"], "turn 2 is 'system', expected 'assistant'"),
        (["user", "assistant"], "must end with a user turn"),
        (["system"], "must end with a user turn"),
    ],
)
def test_llama2_alternation(roles: list[str], message: str) -> None:
    with pytest.raises(MrlhfError, match=message):
        get_template("llama2").render_prompt([Turn(role, "x") for role in roles])


def test_response_suffix_sentencepiece() -> None:
    tok = Tokenizer.load(str(TINY_MODEL))  # eos is </s>
    assert get_template("plain").response_suffix(tok) == ""
    assert get_template("llama2").response_suffix(tok) == ""
    assert get_template("chatml").response_suffix(tok) == "<|im_end|>"


def test_response_suffix_chatml_skipped_when_eos_is_im_end(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    tok = Tokenizer.load(str(HF_DIR))  # eos is </s>
    assert get_template("chatml").response_suffix(tok) == "<|im_end|>"
    (tmp_path / "tokenizer.json").write_bytes((HF_DIR / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": null, "eos_token": "<|im_end|>"}')
    qwen_like = Tokenizer.load(str(tmp_path))
    assert get_template("chatml").response_suffix(qwen_like) == ""
    assert get_template("plain").response_suffix(qwen_like) == ""


def test_chatml_prompt_tokens_with_hf_tokenizer() -> None:
    pytest.importorskip("tokenizers")
    tok = Tokenizer.load(str(HF_DIR))
    prompt = get_template("chatml").render_prompt(MULTI_TURN)
    ids = tok.encode(prompt)
    assert ids.count(3) == 5 and ids.count(4) == 4  # <|im_start|> / <|im_end|> are single special tokens
    assert tok.decode(ids) == prompt
