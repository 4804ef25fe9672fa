"""Serving on rank 0 without a model: request validation (every rejection a 4xx in OpenAI's shape), incremental
detokenization against a full decode, stop strings, and the per-choice state built from engine events."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import mrlhf
from mrlhf.data.templates import get_template
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.serving.engine import TokenEvent
from mrlhf.serving.jobs import Choice
from mrlhf.serving.protocol import APIError, ModelCard, parse_json, resolve_chat, resolve_completion
from mrlhf.serving.text import Detokenizer, StopText

DEMO_TOKENIZER = Path(mrlhf.__file__).parent / "assets" / "demo" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(str(DEMO_TOKENIZER))


@pytest.fixture
def card(tok) -> ModelCard:
    return ModelCard(name="tiny", context=64, vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id,
                     encode=tok.encode, template=get_template("plain"), max_choices=8, max_n=4, max_tokens_cap=None)  # fmt: skip


def rejected(fn, body, card) -> APIError:
    with pytest.raises(APIError) as info:
        fn(body, card)
    err = info.value
    assert 400 <= err.status < 500 and set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("raw", [b"", b"  ", b"{", b'{"a": NaN}', b'{"a": Infinity}', b"\xff{}", b"\xef\xbb\xbf{}",
                                 b"[" * 50_000 + b"]" * 50_000, b"[]", b"1", b"null", b'"x"', b'{"a": 1} 2'])  # fmt: skip
def test_parse_json_accepts_only_objects(raw):
    with pytest.raises(APIError) as info:
        parse_json(raw)
    assert info.value.status == 400


def test_completion_prompts_in_every_openai_form(card, tok):
    bos = [tok.bos_id]
    spec = resolve_completion({"model": "tiny", "prompt": "What is 1 + 2?"}, card)
    assert spec.prompts == [bos + tok.encode("What is 1 + 2?")] and spec.n == 1 and spec.max_tokens == [16]
    assert spec.sampling.temperature == 1.0 and spec.stop_token_ids == (tok.eos_id,) and spec.logprobs is None
    spec = resolve_completion({"model": "tiny", "prompt": ["a", "b c"], "n": 2.0, "max_tokens": 3}, card)
    assert (
        spec.prompts == [bos + tok.encode("a"), bos + tok.encode("b c")] and spec.n == 2 and spec.max_tokens == [3, 3]
    )
    assert resolve_completion({"model": "tiny", "prompt": [5, 6, 7]}, card).prompts == [[5, 6, 7]]
    assert resolve_completion({"model": "tiny", "prompt": [[5], [6, 7]]}, card).prompts == [[5], [6, 7]]
    spec = resolve_completion({"model": "tiny", "prompt": "x", "ignore_eos": True, "stop_token_ids": [9, 9],
                               "stop": "END", "seed": 3, "temperature": 0, "logprobs": 2}, card)  # fmt: skip
    assert spec.stop_token_ids == (9,) and spec.stop == ("END",) and spec.sampling.seed == 3 and spec.logprobs == 2
    assert spec.sampling.greedy


def test_chat_renders_the_checkpoint_template(card, tok):
    body = {"model": "tiny", "messages": [{"role": "developer", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "1 + "},
                                                                       {"type": "text", "text": "2?"}]}],
            "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5}  # fmt: skip
    spec = resolve_chat(body, card)
    text = "<|system|>\nBe brief.\n<|user|>\n1 + 2?\n<|assistant|>\n"
    assert spec.prompts == [[tok.bos_id] + tok.encode(text)] and spec.logprobs == 3 and spec.max_tokens == [5]
    default = resolve_chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, card)
    assert default.max_tokens == [card.context - len(default.prompts[0])]  # chat: the rest of the context


REJECTED_COMPLETIONS = [
    ({"model": "other", "prompt": "x"}, 404, "model"), ({}, 400, "prompt"), ({"prompt": ""}, 400, "prompt"), ({"prompt": []}, 400, "prompt"), ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"), ({"prompt": [10**6]}, 400, "prompt"), ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": "a\x00"}, 400, "prompt"), ({"prompt": "\ud800"}, 400, "prompt"), ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": ["a"] * 3, "n": 3}, 400, "n"), ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"), ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"), ({"prompt": "x", "max_tokens": 64}, 400, "prompt"),
    ({"prompt": "x", "temperature": 2.1}, 400, "temperature"), ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"), ({"prompt": "x", "seed": 2**63}, 400, "seed"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"), ({"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids"), ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "suffix": ""}, 400, "suffix"), ({"prompt": "x", "best_of": 1}, 400, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"), ({"prompt": "x", "logit_bias": {"1": 2}}, 400,
    "logit_bias"), ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "tools": []}, 400, "tools"), ({"prompt": "x", "messages": []}, 400, "messages"),
]  # fmt: skip


@pytest.mark.parametrize("body,status,param", REJECTED_COMPLETIONS)
def test_completion_rejections_name_the_parameter(card, body, status, param):
    err = rejected(resolve_completion, {"model": "tiny"} | body, card)
    assert (err.status, err.param) == (status, param), err.message
    assert rejected(resolve_completion, {"prompt": "x"}, card).param == "model"


def test_context_overflow_says_how_much(card):
    err = rejected(resolve_completion, {"model": "tiny", "prompt": "word " * 100}, card)
    assert err.code == "context_length_exceeded" and "maximum context length is 64 tokens" in err.message
    card.max_tokens_cap = 4
    assert rejected(resolve_completion, {"model": "tiny", "prompt": "x", "max_tokens": 5}, card).param == "max_tokens"
    assert resolve_chat({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, card).max_tokens == [4]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format.type"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
])  # fmt: skip
def test_chat_rejections(card, body, param):
    assert rejected(resolve_chat, {"model": "tiny"} | body, card).param == param


def test_detokenizer_deltas_concatenate_to_a_full_decode(tok):
    """Random id sequences (byte-fallback pieces included) decoded one token at a time: the deltas, then the flush,
    are exactly decode(all ids); a held-back incomplete character is never emitted half."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        d = Detokenizer(tok.decode)
        parts = [d.add(i) for i in ids]
        assert all(not p.endswith("\ufffd") for p in parts)
        assert "".join(parts) + d.flush() == tok.decode(ids)
    text = "Answer: 12 € and ü"
    d = Detokenizer(tok.decode)
    assert "".join(d.add(i) for i in tok.encode(text)) + d.flush() == tok.decode(tok.encode(text))


@pytest.mark.parametrize("deltas,stops,want,stopped", [
    (["hel", "lo wor", "ld"], ["wor"], "hello ", True),
    (["a", "b", "c"], ["bc"], "a", True),
    (["ab", "x"], ["abc"], "abx", False),  # "ab" held back until "x" shows it is no stop string
    (["x", "ab"], ["abc"], "xab", False),  # released by the flush at the end
    (["STOP", "later"], ["STOP"], "", True),
    (["one two three"], ["three", "two"], "one ", True),  # the earliest of several
    (["abc"], [], "abc", False),
])  # fmt: skip
def test_stop_strings_cut_at_the_first_one(deltas, stops, want, stopped):
    s = StopText(stops)
    out = "".join(s.feed(d) for d in deltas) + s.flush()
    assert out == want and s.stopped == stopped


def test_choice_hides_the_stop_token_and_cancels_on_a_stop_string(tok):
    ids = tok.encode("12 + 3 = 15.")
    c = Choice(0, tok.decode, (), logprobs=1)
    for i in ids:
        c.on_event(TokenEvent(0, 0, i, -0.5, ((i, -0.5),), None))
    upd, cancel = c.on_event(TokenEvent(0, 0, tok.eos_id, -0.1, (), "stop"))
    assert "".join(c.text) == tok.decode(ids) and upd.finish == "stop" and not cancel
    assert len(c.entries) == len(ids) and c.tokens == len(ids) + 1  # the stop token counts, is not shown
    assert "".join(e.token for e in c.entries) == tok.decode(ids) and c.entries[0].top[0][0] == c.entries[0].token
    c = Choice(1, tok.decode, ("=",), logprobs=None)
    cancels = [c.on_event(TokenEvent(0, 1, i, -0.5, (), None))[1] for i in ids]
    assert "".join(c.text) == "12 + 3 " and c.finish == "stop" and cancels.count(True) == 1
    c = Choice(2, tok.decode, (), logprobs=None)
    for j, i in enumerate(ids):
        upd, _ = c.on_event(TokenEvent(0, 2, i, -0.5, (), "length" if j == len(ids) - 1 else None))
    assert upd.finish == "length" and "".join(c.text) == tok.decode(ids)
