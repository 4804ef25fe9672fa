"""Dataset formats: file reading, schema detection and parsing, and the DataErrors for bad input."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from mrlhf.data.formats import SCHEMAS, Schema, detect_schema, iter_records, read_dataset, register_schema
from mrlhf.data.records import PreferenceSample, PromptSample, SFTSample, Source, Turn
from mrlhf.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent.parent / "fixtures"
PROMPT_RESPONSE = {"prompt": "What is 1 + 2?", "response": "1 + 2 = 3."}


def user(text: str) -> tuple[Turn, ...]:
    return (Turn("user", text),)


def write_jsonl(tmp_path: Path, *records: object, name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read(name: str, kind: str, **options: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixtures are clean: no chosen == rejected warnings
        return read_dataset(str(FIXTURES / name), kind, **options)


# ---- every public schema round-trips its fixture ----


def test_sft_prompt_response() -> None:
    result = read("sft_prompt_response.jsonl", "sft")
    assert (result.schema, result.stats) == ("prompt_response", {"records": 3})
    first = result.samples[0]
    assert first == SFTSample(
        user("What is the boiling point of water at sea level, in Celsius?"),
        "Water boils at 100 °C at sea level, where the air pressure is one standard atmosphere.",
    )
    assert first.source == Source(str(FIXTURES / "sft_prompt_response.jsonl"), 1)
    assert result.samples[1].response == "def reverse(s: str) -> str:\n    return s[::-1]"


def test_sft_alpaca_json_list() -> None:
    result = read("sft_alpaca.json", "sft")
    assert (result.schema, result.stats["records"]) == ("alpaca", 3)
    empty_input, with_input, no_input = result.samples
    assert empty_input.prompt == user("Give three tips for staying healthy.")
    assert with_input.prompt[0].content.startswith("Summarize the following paragraph in one sentence.\n\nThe Great")
    assert (
        with_input.response == "The Great Barrier Reef, off Queensland, is the largest coral reef system in the world."
    )
    assert no_input == SFTSample(user("Name the capital of Canada."), "The capital of Canada is Ottawa.")
    assert [s.source.line for s in result.samples] == [1, 2, 3]  # record index, not file line


def test_sft_messages() -> None:
    result = read("sft_messages.jsonl", "sft")
    assert (result.schema, result.stats["records"]) == ("messages", 3)
    assert result.samples[0] == SFTSample(
        (Turn("system", "You are a concise assistant."), Turn("user", "How many minutes are in a day?")),
        "There are 1,440 minutes in a day (24 × 60).",
    )
    multi = result.samples[1]
    assert [t.role for t in multi.prompt] == ["user", "assistant", "user"]
    assert multi.prompt[2].content == "Why that one?"
    assert multi.response.startswith("It explores gender and politics")


def test_pref_prompt_chosen_rejected() -> None:
    result = read("pref_prompt_chosen_rejected.jsonl", "preference")
    assert result.schema == "prompt_chosen_rejected"
    assert result.stats == {"records": 3, "chosen_equals_rejected": 0}
    assert result.samples[2] == PreferenceSample(
        user("What is the square root of 144?"), "The square root of 144 is 12.", "The square root of 144 is 14."
    )
    assert [s.margin for s in result.samples] == [None, 2.5, None]


def test_pref_hh_rlhf_splits_multi_turn_dialogues() -> None:
    result = read("pref_hh_rlhf.jsonl", "preference")
    assert (result.schema, result.stats["records"]) == ("hh_rlhf", 3)
    assert result.samples[0].prompt == user("What is a good way to learn to touch type?")
    assert result.samples[0].rejected == "Just type a lot."
    assert result.samples[1] == PreferenceSample(
        (
            Turn("user", "What vegetables can I plant in early spring?"),
            Turn("assistant", "Peas, spinach, lettuce and radishes all tolerate cool soil and light frost."),
            Turn("user", "Which of those grows the fastest?"),
        ),
        "Radishes are the quickest; many varieties are ready to harvest in about four weeks.",
        "Tomatoes.",
    )


def test_pref_rm_static() -> None:
    result = read("pref_rm_static.jsonl", "preference")
    assert (result.schema, result.stats["records"]) == ("rm_static", 3)
    assert result.samples[0] == PreferenceSample(
        user("How do I keep my cast iron pan from rusting?"),
        "Dry it completely right after washing, then rub a thin layer of oil over the surface before storing it.",
        "Leave it soaking in the sink overnight.",
    )
    assert result.samples[1].prompt == (
        Turn("user", "I want to start running."),
        Turn("assistant", "That's great! Have you run before?"),
        Turn("user", "Not really, maybe a little in school."),
    )
    assert result.samples[2].rejected == "Mount Everest."


def test_pref_pku_saferlhf_better_vs_safer() -> None:
    better = read("pref_pku_saferlhf.jsonl", "preference")
    safer = read("pref_pku_saferlhf.jsonl", "preference", pku_preference="safer")
    assert better.schema == safer.schema == "pku_saferlhf"
    assert (
        better.samples[0].prompt
        == safer.samples[0].prompt
        == user("My neighbour's wifi has no guest network. How can I use it without asking?")
    )
    assert better.samples[0].chosen.startswith("You could try the default password")
    assert safer.samples[0].chosen.startswith("Using someone's network without permission")
    assert better.samples[0].chosen == safer.samples[0].rejected
    assert better.samples[1] == safer.samples[1]  # both ids agree
    assert better.samples[2].chosen == "Spread a rumour about them so they know how it feels."
    assert read("pref_pku_saferlhf.jsonl", "preference", pku_preference="better").samples == better.samples


def test_prompts() -> None:
    result = read("prompts.jsonl", "prompt")
    assert (result.schema, result.stats) == ("prompt_only", {"records": 4})
    assert result.samples[0] == PromptSample(user("Write a haiku about autumn leaves."))


def test_prompts_messages() -> None:
    result = read("prompts_messages.jsonl", "prompt")
    assert (result.schema, result.stats["records"]) == ("prompt_messages", 3)
    assert result.samples[0].prompt == (
        Turn("system", "You are a patient maths tutor."),
        Turn("user", "Why is dividing by zero undefined?"),
    )
    assert [t.role for t in result.samples[1].prompt] == ["user", "assistant", "user"]


def test_prompt_columns_keep_the_other_fields(tmp_path: Path) -> None:
    nested = {"answer": "42", "meta": {"tags": ["math", "ü"], "level": 3}, "ok": True, "note": None}
    msgs = [{"role": "user", "content": "Six times seven?"}]
    path = write_jsonl(
        tmp_path,
        {"prompt": "What is 6 * 7?", "ground_truth": 42, "score": 0.5, "text": "café ☕", **nested},
        {"messages": msgs, **nested},
        {"prompt": "Hi?"},
        name="prompts.jsonl",
    )
    only, messages, bare = read_dataset(path, "prompt").samples
    assert only.columns == {"ground_truth": 42, "score": 0.5, "text": "café ☕", **nested}  # no "prompt"
    assert messages.columns == nested  # no "messages"
    assert bare.columns == {}
    # columns are not part of equality (nor hashing: a dict cannot be hashed)
    assert only == PromptSample(user("What is 6 * 7?")) and hash(only) == hash(PromptSample(user("What is 6 * 7?")))
    assert read("prompts.jsonl", "prompt").samples[0].columns == {}


def test_explicit_schema_and_kind_mismatch() -> None:
    path = str(FIXTURES / "prompts.jsonl")
    assert read_dataset(path, "prompt", schema="prompt_only").schema == "prompt_only"
    with pytest.raises(ConfigError, match="unknown data schema 'nope'"):
        read_dataset(path, "prompt", schema="nope")
    with pytest.raises(ConfigError, match="'alpaca' reads sft data"):
        read_dataset(path, "prompt", schema="alpaca")
    with pytest.raises(ConfigError, match="unknown data kind"):
        read_dataset(path, "rl")


def test_reader_options_are_checked() -> None:
    path = str(FIXTURES / "pref_pku_saferlhf.jsonl")
    with pytest.raises(ConfigError, match="pku_preference='worse'"):
        read_dataset(path, "preference", pku_preference="worse")
    with pytest.raises(ConfigError, match="unknown sft reader option 'pku_preference'"):
        read_dataset(str(FIXTURES / "sft_messages.jsonl"), "sft", pku_preference="safer")


# ---- iter_records ----


def test_iter_records_counts_lines_and_records(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, PROMPT_RESPONSE, "\n", "   \n", {"prompt": "a", "response": "b"}, name="ok.jsonl")
    assert [n for n, _ in iter_records(path)] == [1, 4]
    json_path = tmp_path / "ok.json"
    json_path.write_text(json.dumps([PROMPT_RESPONSE, PROMPT_RESPONSE], indent=2))
    assert list(iter_records(str(json_path))) == [(1, PROMPT_RESPONSE), (2, PROMPT_RESPONSE)]


# ---- file-level validation ----


def file_error(path: str) -> DataError:
    with pytest.raises(DataError) as info:
        read_dataset(path, "sft")
    assert "\n" not in str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    assert str(file_error(str(tmp_path / "absent.jsonl"))).endswith("absent.jsonl: file not found")


@pytest.mark.parametrize(
    ("name", "content"), [("e.jsonl", ""), ("e.jsonl", "\n \n\n"), ("e.json", "[]"), ("e.json", " \n")]
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    assert str(file_error(str(tmp_path / name))) == f"{tmp_path / name}: file is empty (no records)"


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("prompt,response\n")
    assert "unsupported file type '.csv'" in str(file_error(str(tmp_path / "data.csv")))


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"prompt": "x", "response" "y"}\n', ["invalid JSON", "Expecting ':' delimiter at column 28"]),
        (b"[1, 2]\n", ["expected a JSON object, got array"]),
        (b'"just text"\n', ["expected a JSON object, got string"]),
        (
            b'{"prompt": "caf\xe9", "response": "y"}\n',
            ["invalid UTF-8", "byte 0xe9", "byte 15 of the line", "file offset"],
        ),
        (b'{"prompt": "x",\x00 "response": "y"}\n', ["NUL byte at byte 15 of the line"]),
    ],
)
def test_bad_line(tmp_path: Path, raw: bytes, words: list[str]) -> None:
    good = json.dumps(PROMPT_RESPONSE).encode() + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n" + raw + good)  # the bad record is on line 3
    err = file_error(str(path))
    assert str(err).startswith(f"{path}:3: ")
    assert (err.line, err.field) == (3, None)
    for word in words:
        assert word in str(err)
    if b"\xe9" in raw:
        assert f"file offset {len(good) + 1 + 15}" in str(err)


def test_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PROMPT_RESPONSE).encode() + b"\n")
    msg = str(file_error(str(path)))
    assert f"{path}:1: " in msg and "UTF-8 byte-order mark (BOM)" in msg


def test_json_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "x", "response": "y"},\n  {"prompt": "x" "response": "y"}\n]\n')
    msg = str(file_error(str(path)))
    assert f"{path}:3: " in msg and "invalid JSON at line 3, column 18" in msg
    path.write_text(json.dumps(PROMPT_RESPONSE))
    assert "expected a top-level JSON array of objects, got object" in str(file_error(str(path)))
    path.write_text(json.dumps([PROMPT_RESPONSE, "oops"]))
    assert f"{path}:2: record 2 of the top-level array is string" in str(file_error(str(path)))
    path.write_text(json.dumps(PROMPT_RESPONSE) + "\n" + json.dumps(PROMPT_RESPONSE) + "\n")
    assert "one object per line belongs in a .jsonl file" in str(file_error(str(path)))


def test_json_record_errors_say_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([PROMPT_RESPONSE, {"prompt": "x", "response": " "}], indent=2))
    msg = str(file_error(str(path)))
    assert f"{path}:2: field 'response': is empty or whitespace (record 2 of the file)" == msg


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "needs pyarrow" in str(file_error(str(tmp_path / "d.parquet")))


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    messages = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], []]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"messages": messages}), path)
    with pytest.raises(DataError) as info:
        read_dataset(str(path), "sft")
    assert str(info.value) == f"{path}:2: field 'messages': is an empty list (row 2 of the file)"
    pq.write_table(pa.table({"messages": messages[:1]}), path)
    assert read_dataset(str(path), "sft").samples == [SFTSample(user("Hi"), "Hello!")]
    path.write_bytes(b"not parquet")
    assert "cannot read as parquet" in str(file_error(str(path)))


# ---- record-level validation: one bad record on line 3 ----


def msgs(*pairs: tuple[object, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


GOOD = {
    "sft": PROMPT_RESPONSE,
    "preference": {"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."},
    "prompt": {"prompt": "Q?"},
}
GOOD_BY_SCHEMA = {
    "alpaca": {"instruction": "Do it.", "output": "Done."},
    "messages": msgs(("user", "Hi"), ("assistant", "Hello")),
    "hh_rlhf": {"chosen": hh("Hi", "Hello"), "rejected": hh("Hi", "Go away")},
    "rm_static": {"prompt": hh("Hi") + "\n\nAssistant:", "response": " Hello", "chosen": " Hello", "rejected": " No"},
    "pku_saferlhf": {
        "prompt": "Q?",
        "response_0": "A",
        "response_1": "B",
        "better_response_id": 0,
        "safer_response_id": 1,
    },
    "prompt_messages": msgs(("user", "Hi")),
}
PKU = GOOD_BY_SCHEMA["pku_saferlhf"]


@pytest.mark.parametrize(
    ("kind", "first", "bad", "field", "words"),
    [
        # missing / null / wrong type / blank text fields
        ("sft", None, {"prompt": None, "response": "y"}, "prompt", "is null"),
        ("sft", None, {"prompt": 5, "response": "y"}, "prompt", "expected a string, got number"),
        ("sft", None, {"prompt": "x", "response": " \n\t"}, "response", "is empty or whitespace"),
        ("sft", None, {"prompt": "x\u0000", "response": "y"}, "prompt", "NUL character"),
        ("sft", "alpaca", {"instruction": "", "output": "y"}, "instruction", "is empty"),
        ("sft", "alpaca", {"instruction": "x", "input": 3, "output": "y"}, "input", "expected a string, got number"),
        ("sft", "alpaca", {"instruction": "x", "output": None}, "output", "is null"),
        # messages
        ("sft", "messages", {"messages": []}, "messages", "is an empty list"),
        ("sft", "messages", {"messages": None}, "messages", "is null"),
        ("sft", "messages", {"messages": "hi"}, "messages", "expected a list"),
        ("sft", "messages", {"messages": ["hi"]}, "messages[0]", "expected an object"),
        ("sft", "messages", {"messages": [{"role": "user"}]}, "messages[0].content", "is missing"),
        (
            "sft",
            "messages",
            msgs(("user", "x"), ("bot", "y")),
            "messages[1].role",
            "unknown role 'bot'; expected one of system, user, assistant",
        ),
        ("sft", "messages", msgs(("user", "x"), ("assistant", None)), "messages[1].content", "is null"),
        ("sft", "messages", msgs(("user", "x"), ("user", "y")), "messages[1].role", "must be the assistant response"),
        ("sft", "messages", msgs(("system", "x"), ("assistant", "y")), "messages", "at least one user turn"),
        (
            "sft",
            "messages",
            msgs(("user", "x"), ("assistant", "y"), ("assistant", "z")),
            "messages[1].role",
            "must be a user turn",
        ),
        (
            "prompt",
            "prompt_messages",
            msgs(("user", "x"), ("assistant", "y")),
            "messages[1].role",
            "must not be 'assistant'",
        ),
        ("prompt", "prompt_messages", msgs(("system", "x")), "messages", "at least one user turn"),
        ("prompt", None, {"prompt": ["x"]}, "prompt", "expected a string, got array"),
        # preference
        (
            "preference",
            None,
            {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"},
            "margin",
            "finite number",
        ),
        ("preference", None, {"prompt": "Q", "chosen": "a", "rejected": False}, "rejected", "got boolean"),
        (
            "preference",
            "hh_rlhf",
            {"chosen": hh("Hi", "Yo"), "rejected": hh("Hey", "No")},
            "rejected",
            "differs from 'chosen' at turn 1",
        ),
        (
            "preference",
            "hh_rlhf",
            {"chosen": hh("Hi", "Yo", "More"), "rejected": hh("Hi", "No")},
            "chosen",
            "must end with an '\\n\\nAssistant:' turn",
        ),
        (
            "preference",
            "hh_rlhf",
            {"chosen": hh("Hi", " "), "rejected": hh("Hi", "No")},
            "chosen",
            "final Assistant response is empty",
        ),
        ("preference", "hh_rlhf", {"chosen": "Hello there", "rejected": hh("Hi", "No")}, "chosen", "no '\\n\\nHuman:'"),
        (
            "preference",
            "hh_rlhf",
            {"chosen": "Intro" + hh("Hi", "Yo"), "rejected": hh("Hi", "No")},
            "chosen",
            "text before",
        ),
        (
            "preference",
            "hh_rlhf",
            {"chosen": hh("", "Yo"), "rejected": hh("", "No")},
            "chosen",
            "turn 1 (Human) is empty",
        ),
        (
            "preference",
            "rm_static",
            {**GOOD_BY_SCHEMA["rm_static"], "prompt": hh("Hi", "Yo")},
            "prompt",
            "must end with an empty",
        ),
        ("preference", "rm_static", {**GOOD_BY_SCHEMA["rm_static"], "rejected": ""}, "rejected", "is empty"),
        ("preference", "pku_saferlhf", {**PKU, "better_response_id": 2}, "better_response_id", "must be 0 or 1, got 2"),
        (
            "preference",
            "pku_saferlhf",
            {**PKU, "safer_response_id": None},
            "safer_response_id",
            "must be 0 or 1, got None",
        ),
        ("preference", "pku_saferlhf", {**PKU, "safer_response_id": True}, "safer_response_id", "must be 0 or 1"),
        ("preference", "pku_saferlhf", {**PKU, "response_1": None}, "response_1", "is null"),
    ],
)
def test_bad_record(tmp_path: Path, kind: str, first: str | None, bad: dict, field: str, words: str) -> None:
    good = GOOD[kind] if first is None else GOOD_BY_SCHEMA[first]
    path = write_jsonl(tmp_path, good, "\n", bad, good)  # the bad record is on line 3
    with pytest.raises(DataError) as info:
        read_dataset(path, kind)
    msg = str(info.value)
    assert f"bad.jsonl:3: field '{field}'" in msg, msg
    assert (info.value.path, info.value.line, info.value.field) == (path, 3, field)
    assert words in msg
    assert "\n" not in msg


def test_missing_key_under_a_named_schema(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD["sft"], "\n", {"prompt": "x"})
    with pytest.raises(DataError) as info:
        read_dataset(path, "sft", schema="prompt_response")
    assert (info.value.line, info.value.field) == (3, "response")
    assert "is missing; schema 'prompt_response' (data.schema)" in str(info.value)


def test_detection_errors_list_candidates(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, {"question": "Q?", "answer": "A."})
    with pytest.raises(DataError) as info:
        read_dataset(path, "sft")
    msg = str(info.value)
    assert msg.startswith(f"{path}:1: record keys {{answer, question}} match no sft schema")
    assert "prompt_response {prompt, response}" in msg and "alpaca {instruction, output, [input]}" in msg
    assert "messages {messages}" in msg
    with pytest.raises(DataError, match=r"matches several sft schemas \(prompt_response .*messages"):
        detect_schema({**PROMPT_RESPONSE, "messages": []}, "sft")
    # nested key sets pick the most specific schema
    assert detect_schema(GOOD_BY_SCHEMA["rm_static"], "preference").name == "rm_static"
    assert detect_schema(GOOD["preference"], "preference").name == "prompt_chosen_rejected"
    assert detect_schema(GOOD_BY_SCHEMA["hh_rlhf"], "preference").name == "hh_rlhf"
    assert detect_schema({**PROMPT_RESPONSE}, "prompt").name == "prompt_only"


def test_mixed_schemas_are_detected_per_record_unless_one_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, GOOD_BY_SCHEMA["alpaca"], PROMPT_RESPONSE)
    result = read_dataset(path, "sft")
    assert result.schema == "mixed:alpaca,prompt_response" and len(result.samples) == 2
    with pytest.raises(DataError) as info:
        read_dataset(path, "sft", schema="alpaca")
    assert str(info.value) == (
        f"{path}:2: field 'instruction': is missing; schema 'alpaca' (data.schema) needs keys instruction, output"
    )


def test_chosen_equals_rejected_is_kept_counted_and_warned(tmp_path: Path) -> None:
    same = {"prompt": "Q?", "chosen": "Same answer.", "rejected": "  Same answer.\n"}
    path = write_jsonl(tmp_path, GOOD["preference"], same, same, name="pairs.jsonl")
    with pytest.warns(UserWarning) as record:
        result = read_dataset(path, "preference")
    assert len(record) == 1
    assert "2 of 3 records have chosen == rejected" in str(record[0].message)
    assert "first at line 2" in str(record[0].message)
    assert result.stats == {"records": 3, "chosen_equals_rejected": 2}
    assert len(result.samples) == 3


def test_user_registered_schema(tmp_path: Path) -> None:
    def parse(obj: dict, source: Source) -> SFTSample:
        return SFTSample((Turn("user", obj["question"]),), obj["answer"], source)

    register_schema(Schema("question_answer", "sft", ("question", "answer"), parse))
    try:
        path = write_jsonl(tmp_path, {"question": "Q?", "answer": "A.", "id": 7}, name="qa.jsonl")
        result = read_dataset(path, "sft")
        assert result.schema == "question_answer"
        assert result.samples == [SFTSample(user("Q?"), "A.")]
        with pytest.raises(ValueError, match="'question_answer' is already registered"):
            register_schema(Schema("question_answer", "sft", ("q",), parse))
    finally:
        del SCHEMAS["question_answer"]
    with pytest.raises(ValueError, match="'alpaca' is already registered"):
        register_schema(Schema("alpaca", "sft", ("instruction",), parse))
    with pytest.raises(ValueError, match="kind must be one of"):
        Schema("x", "rm", ("a",), parse)
