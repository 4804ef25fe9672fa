"""Tokenized datasets: cache hits and invalidation, length policies, blending ratios, stage/eval splits, order."""

import json

import numpy as np
import pytest

from mrlhf.config import load_config
from mrlhf.data.datasets import (
    BlendedDataset,
    TokenizeOptions,
    build_datasets,
    global_batch_indices,
    load_tokenized,
    split_indices,
)
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.errors import DataError

TOK = "mrlhf/assets/tiny/tokenizer.model"


class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def tok():
    return CountingTokenizer(Tokenizer.load(TOK))


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}."} for i in range(40)]
    )


def test_cache_hit_skips_tokenization_and_is_invalidated(tok, sft_file, tmp_path):
    cache = str(tmp_path / "cache")
    opts = TokenizeOptions(max_seq_len=64, max_prompt_len=32)
    first = load_tokenized(sft_file, "sft", tok, opts, cache)
    calls = tok.calls
    assert calls > 0 and not first.cache_hit
    second = load_tokenized(sft_file, "sft", tok, opts, cache)
    assert tok.calls == calls and second.cache_hit  # no tokenizer call on a hit
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    # a different template misses the cache
    load_tokenized(sft_file, "sft", tok, TokenizeOptions(template="chatml", max_seq_len=128, max_prompt_len=96), cache)
    assert tok.calls > calls
    # a different tokenizer (hash) misses too
    calls = tok.calls
    other = CountingTokenizer(Tokenizer.load(TOK))
    other.__dict__["hash"] = "0" * 64
    load_tokenized(sft_file, "sft", other, opts, cache)
    assert other.calls > 0
    # and so does an edited file
    with open(sft_file, "a") as f:
        f.write(json.dumps({"prompt": "new?", "response": "yes."}) + "\n")
    calls = tok.calls
    again = load_tokenized(sft_file, "sft", tok, opts, cache)
    assert tok.calls > calls and len(again) == 41


def test_sft_tokens_and_loss_flags(tok, sft_file):
    ds = load_tokenized(sft_file, "sft", tok, TokenizeOptions(max_seq_len=64, max_prompt_len=32), None)
    tokens, flags = ds[3]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    n_resp = len(tok.inner.encode("6.")) + 1
    assert flags == [0] * (len(tokens) - n_resp) + [1] * n_resp
    assert tok.inner.decode(tokens[len(tokens) - n_resp : -1]) == "6."


def test_length_policies(tok, tmp_path):
    long_prompt = "What is " + " + ".join(["1"] * 30) + "?"
    path = write_jsonl(
        tmp_path / "len.jsonl",
        [
            {"prompt": "Hi?", "response": "ok."},
            {"prompt": long_prompt, "response": "30."},
            {"prompt": "Q?", "response": "a " * 40},
        ],
    )
    with pytest.raises(DataError) as e:
        load_tokenized(path, "sft", tok, TokenizeOptions(max_seq_len=40, max_prompt_len=20), None)
    assert "len.jsonl:2" in str(e.value) and "field 'prompt'" in str(e.value) and "max_prompt_len=20" in str(e.value)
    dropped = load_tokenized(
        path, "sft", tok, TokenizeOptions(max_seq_len=40, max_prompt_len=20, length_policy="drop"), None
    )
    assert len(dropped) == 1 and dropped.stats["dropped"] == 2
    cut = load_tokenized(
        path, "sft", tok, TokenizeOptions(max_seq_len=40, max_prompt_len=20, length_policy="truncate"), None
    )
    assert len(cut) == 3 and cut.stats["truncated_prompt"] == 1 and cut.stats["truncated_response"] == 1
    tokens, flags = cut[2]
    assert len(tokens) == 40 and tokens[-1] != tok.eos_id  # a cut response does not end with eos
    assert len(cut[1][0]) <= 40 and cut[1][0][0] == tok.bos_id


def test_blend_ratios_hold_within_two_percent():
    a, b, c = list(range(100)), list(range(1000, 1300)), list(range(5000, 5050))
    blend = BlendedDataset([a, b, c], [0.5, 0.3, 0.2], seed=3, size=20000)
    draws = [blend[i] for i in global_batch_indices(len(blend), 1, 0, 10000)]
    share = [np.mean([lo <= x < hi for x in draws]) for lo, hi in ((0, 100), (1000, 1300), (5000, 5050))]
    assert all(abs(s - r) <= 0.02 for s, r in zip(share, (0.5, 0.3, 0.2))), share
    # every prefix of the blend itself is within one sample of the ratio per source
    src = blend.source[:999]
    assert abs((src == 0).sum() - 0.5 * 999) <= 1 and abs((src == 2).sum() - 0.2 * 999) <= 1


def test_stage_split_is_disjoint_complete_and_deterministic():
    parts = [split_indices(1000, [2, 4, 4], k, seed=5) for k in range(3)]
    assert [len(p) for p in parts] == [200, 400, 400]
    assert len(set().union(*map(set, parts))) == 1000
    assert all(np.array_equal(p, split_indices(1000, [2, 4, 4], k, seed=5)) for k, p in enumerate(parts))
    assert not np.array_equal(parts[0], split_indices(1000, [2, 4, 4], 0, seed=6))


def test_resumed_iterator_continues_exactly():
    n, gbs = 37, 8
    stream = [i for step in range(10) for i in global_batch_indices(n, 9, step * gbs, gbs)]
    resumed = [i for step in range(4, 10) for i in global_batch_indices(n, 9, step * gbs, gbs)]
    assert stream[4 * gbs :] == resumed
    assert sorted(stream[:n]) == list(range(n))  # each epoch is a permutation


def test_build_datasets_from_config_split_and_eval(tmp_path, sft_file):
    cfg = load_config(
        None,
        [
            f"data.train_path={sft_file}",
            f"data.tokenizer_path={TOK}",
            "data.data_split=[2,4,4]",
            "data.eval_fraction=0.25",
            f"data.cache_dir={tmp_path / 'c'}",
            "data.max_seq_len=64",
            "data.max_prompt_len=32",
        ],
    )
    tok = Tokenizer.load(TOK)
    sft = build_datasets(cfg, "sft", "sft", tok)
    ppo_prompts_cfg = cfg  # the same source, the PPO third, as prompts
    assert len(sft.train) + len(sft.eval) == 8  # 2/10 of 40
    sft_items = {tuple(sft.train[i][0]) for i in range(len(sft.train))}
    eval_items = {tuple(sft.eval[i][0]) for i in range(len(sft.eval))}
    assert not sft_items & eval_items
    rm = build_datasets(ppo_prompts_cfg, "sft", "rm", tok)
    rm_items = {tuple(rm.train[i][0]) for i in range(len(rm.train))}
    assert not rm_items & sft_items and len(rm.train) + len(rm.eval) == 16


def test_blended_sources_from_config(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"A{i}?", "response": "a."} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"B{i}?", "response": "b."} for i in range(30)])
    cfg = load_config(
        None, [f"data.sources=['a:3:{a}', 'b:1:{b}']", f"data.tokenizer_path={TOK}", "data.cache_dir=null"]
    )
    tok = Tokenizer.load(TOK)
    bundle = build_datasets(cfg, "sft", "sft", tok)
    a_end = tok.encode("a.")
    firsts = [bundle.train[i][0][-1 - len(a_end) : -1] == a_end for i in range(40)]
    assert sum(firsts) == 30  # 3:1 over the first 40 positions of the blend


def test_prompt_columns_stay_aligned_through_drop_and_cache(tok, tmp_path):
    rows = [
        {"prompt": "Q0?", "answer": "zero", "meta": {"n": [0, 1.5], "ok": True, "none": None}},
        {"prompt": "What is " + " + ".join(["1"] * 30) + "?", "answer": "thirty"},  # too long: dropped
        {"messages": [{"role": "user", "content": "Q2?"}], "answer": "deux é ☕", "id": 2},
        {"prompt": "Q3?"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    opts = TokenizeOptions(max_seq_len=64, max_prompt_len=20, length_policy="drop")
    cache = str(tmp_path / "cache")
    first = load_tokenized(path, "prompt", tok, opts, cache)
    assert len(first) == 3 and first.stats["dropped"] == 1 and not first.cache_hit
    expected = [
        {"answer": "zero", "meta": {"n": [0, 1.5], "ok": True, "none": None}},
        {"answer": "deux é ☕", "id": 2},
        {},
    ]
    assert [first.columns(i) for i in range(3)] == expected
    assert [f"Q{k}?" in tok.inner.decode(first[i]) for i, k in enumerate((0, 2, 3))] == [True] * 3
    second = load_tokenized(path, "prompt", tok, opts, cache)
    assert second.cache_hit and [second.columns(i) for i in range(3)] == expected


@pytest.mark.parametrize("names", [("a",), ("a", "b")])
def test_prompt_columns_follow_splits_and_blends(tmp_path, names):
    paths = [
        write_jsonl(tmp_path / f"{n}.jsonl", [{"prompt": f"{n}{k}?", "src": n, "k": k} for k in range(24)])
        for n in names
    ]
    sources = [f"{n}:1:{p}" for n, p in zip(names, paths)]
    overrides = [
        f"data.sources={sources}",
        f"data.tokenizer_path={TOK}",
        "data.eval_fraction=0.25",
        "data.cache_dir=null",
    ]
    tok = Tokenizer.load(TOK)
    bundle = build_datasets(load_config(None, overrides), "prompt", "ppo", tok)
    view = "Subset" if len(names) == 1 else "BlendedDataset"
    assert type(bundle.train).__name__ == type(bundle.eval).__name__ == view
    for ds in (bundle.train, bundle.eval):
        cols = [ds.columns(i) for i in range(len(ds))]
        assert all(f"{c['src']}{c['k']}?" in tok.decode(ds[i]) for i, c in enumerate(cols))
    train_keys = {(c["src"], c["k"]) for c in map(bundle.train.columns, range(len(bundle.train)))}
    eval_keys = {(c["src"], c["k"]) for c in map(bundle.eval.columns, range(len(bundle.eval)))}
    assert not train_keys & eval_keys and len(eval_keys) == 6 * len(names)
