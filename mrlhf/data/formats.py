"""Dataset file formats: read .jsonl/.json/.parquet records and parse them into typed samples by schema.

A ``Schema`` names the keys a record must have and how it becomes an ``SFTSample``, ``PreferenceSample`` or
``PromptSample``. ``read_dataset`` takes the schema by name or detects it from the first record, then holds every
later record to it, so a file that mixes formats fails at the first odd record instead of half-training on it.
Every problem is a ``DataError`` naming path, position and field. The position is the 1-based line for .jsonl,
the record index in the top-level list for .json and the row for .parquet; messages say which when not a line.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mrlhf.data.records import ROLES, PreferenceSample, PromptSample, Sample, SFTSample, Source, Turn
from mrlhf.errors import ConfigError, DataError

KINDS = ("sft", "preference", "prompt")
_SAMPLE_TYPES = {"sft": SFTSample, "preference": PreferenceSample, "prompt": PromptSample}
_UNITS = {".jsonl": "line", ".json": "record", ".parquet": "row"}  # what N in "path:N" counts
_BOMS = {b"\xef\xbb\xbf": "UTF-8", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _type_name(value: object) -> str:
    """The JSON name of a decoded value's type, for messages read by people who wrote JSON."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


# ---- reading records ----


def iter_records(path: str) -> Iterator[tuple[int, dict]]:
    """Yield `(n, record)` for each object in a .jsonl, .json (top-level array) or .parquet file.

    n is 1-based: the line for .jsonl (blank lines are skipped but counted), the index in the array for .json,
    the row for .parquet. Raises DataError for a missing or empty file and for undecodable content.
    """
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(path, None, None, "file not found")
    if not p.is_file():
        raise DataError(path, None, None, "is not a regular file")
    suffix = p.suffix.lower()
    if suffix not in _UNITS:
        raise DataError(path, None, None, f"unsupported file type '{p.suffix}'; expected .jsonl, .json or .parquet")
    reader = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}[suffix]
    count = 0
    for n, obj in reader(path):
        count += 1
        yield n, obj
    if count == 0:
        raise DataError(path, None, None, "file is empty (no records)")


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield `(1-based line, text)`, rejecting a byte-order mark, NUL bytes and invalid UTF-8 with their position."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                for bom, encoding in _BOMS.items():
                    if raw.startswith(bom):
                        message = f"file starts with a {encoding} byte-order mark (BOM); save it as UTF-8 without BOM"
                        raise DataError(path, 1, None, message)
            nul = raw.find(b"\x00")
            if nul >= 0:
                message = f"NUL byte at byte {nul} of the line (file offset {offset + nul}); is this a binary file?"
                raise DataError(path, line_no, None, message)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                message = (
                    f"invalid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start} of the line "
                    f"(file offset {offset + e.start}); re-encode the file as UTF-8"
                )
                raise DataError(path, line_no, None, message) from None
            offset += len(raw)
            yield line_no, text


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    for line_no, text in _decoded_lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, line_no, None, _jsonl_error(text, e)) from None
        if not isinstance(obj, dict):
            raise DataError(path, line_no, None, f"expected a JSON object, got {_type_name(obj)}")
        yield line_no, obj


def _jsonl_error(text: str, e: json.JSONDecodeError) -> str:
    """The message of a bad .jsonl line, at the column of the line where decoding failed. json counts the line's
    own newline, so an object cut short at the end of a line would otherwise be reported at 'column 1'."""
    line = text.rstrip("\r\n")
    if e.pos >= len(line.rstrip()):
        spread = line.lstrip().startswith("{")
        hint = "; a JSON object spread over several lines? .jsonl needs one object per line" if spread else ""
        return f"invalid JSON: unexpected end of line at column {len(line) + 1} ({e.msg}){hint}"
    return f"invalid JSON: {e.msg} at column {e.colno}"


def _json_position(text: str, e: json.JSONDecodeError) -> tuple[int, int, str]:
    """(line, column, message) of a .json decoding error; a file that ends early is reported at its last character
    rather than on the empty line after it."""
    end = len(text.rstrip())
    if e.pos < end:
        return e.lineno, e.colno, e.msg
    line = text.count("\n", 0, end) + 1
    return line, end - (text.rfind("\n", 0, end) + 1) + 1, f"unexpected end of file ({e.msg}); is the file truncated?"


def _iter_json(path: str) -> Iterator[tuple[int, dict]]:
    text = "".join(t for _, t in _decoded_lines(path))
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one object per line belongs in a .jsonl file" if e.msg == "Extra data" else ""
        line, column, msg = _json_position(text, e)
        raise DataError(path, line, None, f"invalid JSON at line {line}, column {column}: {msg}{hint}") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a top-level JSON array of objects, got {_type_name(data)}")
    for index, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            message = f"record {index} of the top-level array is {_type_name(obj)}, expected an object"
            raise DataError(path, index, None, message)
        yield index, obj


def _iter_parquet(path: str) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, None, None, "reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(path, None, None, f"cannot read as parquet: {e}") from e
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


# ---- field checks shared by the parsers ----


def _check_text(value: object, src: Source, name: str) -> str:
    """Return `value` if it is a non-blank string without NUL, else raise DataError for field `name`."""
    if value is None:
        raise DataError(src.path, src.line, name, "is null; expected a non-empty string")
    if not isinstance(value, str):
        raise DataError(src.path, src.line, name, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(src.path, src.line, name, "is empty or whitespace")
    if "\x00" in value:
        raise DataError(src.path, src.line, name, "contains a NUL character")
    return value


def _get(obj: dict, key: str, src: Source, name: str | None = None) -> object:
    if key not in obj:
        raise DataError(src.path, src.line, name or key, "is missing")
    return obj[key]


def _text(obj: dict, key: str, src: Source, name: str | None = None) -> str:
    return _check_text(_get(obj, key, src, name), src, name or key)


def _user(text: str) -> tuple[Turn, ...]:
    return (Turn("user", text),)


def _turns(obj: dict, key: str, src: Source) -> tuple[Turn, ...]:
    """Validate a list of `{role, content}` messages; nested fields are named like `messages[2].role`."""
    messages = _get(obj, key, src)
    if messages is None:
        raise DataError(src.path, src.line, key, "is null; expected a list of {role, content} objects")
    if not isinstance(messages, list):
        raise DataError(
            src.path, src.line, key, f"expected a list of {{role, content}} objects, got {_type_name(messages)}"
        )
    if not messages:
        raise DataError(src.path, src.line, key, "is an empty list")
    turns = []
    for i, msg in enumerate(messages):
        name = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(
                src.path, src.line, name, f"expected an object with role and content, got {_type_name(msg)}"
            )
        role = _text(msg, "role", src, f"{name}.role")
        if role not in ROLES:
            raise DataError(
                src.path, src.line, f"{name}.role", f"unknown role '{role}'; expected one of {', '.join(ROLES)}"
            )
        turns.append(Turn(role, _text(msg, "content", src, f"{name}.content")))
    return tuple(turns)


def _require_user_turn(turns: tuple[Turn, ...], src: Source, name: str, where: str) -> None:
    if not any(t.role == "user" for t in turns):
        raise DataError(src.path, src.line, name, f"needs at least one user turn {where}")


# ---- SFT schemas ----


def _parse_prompt_response(obj: dict, src: Source) -> SFTSample:
    return SFTSample(_user(_text(obj, "prompt", src)), _text(obj, "response", src), src)


def _parse_alpaca(obj: dict, src: Source) -> SFTSample:
    instruction = _text(obj, "instruction", src)
    extra = obj.get("input")  # optional; "" or null means none
    if extra is not None and not isinstance(extra, str):
        raise DataError(src.path, src.line, "input", f"expected a string, got {_type_name(extra)}")
    if extra and extra.strip():
        instruction = instruction + "\n\n" + _check_text(extra, src, "input")
    return SFTSample(_user(instruction), _text(obj, "output", src), src)


def _parse_messages_sft(obj: dict, src: Source) -> SFTSample:
    turns = _turns(obj, "messages", src)
    last = len(turns) - 1
    if turns[last].role != "assistant":
        message = f"the last message must be the assistant response, got role '{turns[last].role}'"
        raise DataError(src.path, src.line, f"messages[{last}].role", message)
    _require_user_turn(turns[:last], src, "messages", "before the final assistant message")
    # SFTSample's prompt ends with the user turn being answered.
    if turns[last - 1].role != "user":
        message = f"the message before the final assistant response must be a user turn, got '{turns[last - 1].role}'"
        raise DataError(src.path, src.line, f"messages[{last - 1}].role", message)
    return SFTSample(turns[:last], turns[last].content, src)


# ---- preference schemas ----


def _margin(obj: dict, src: Source) -> float | None:
    value = obj.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(src.path, src.line, "margin", f"expected a finite number, got {value!r}")
    return float(value)


def _parse_prompt_chosen_rejected(obj: dict, src: Source) -> PreferenceSample:
    prompt = _user(_text(obj, "prompt", src))
    return PreferenceSample(prompt, _text(obj, "chosen", src), _text(obj, "rejected", src), _margin(obj, src), src)


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text: str, src: Source, name: str) -> list[Turn]:
    """Split an hh-rlhf dialogue "\\n\\nHuman: ...\\n\\nAssistant: ..." into turns with stripped (maybe empty) text."""
    if text.startswith(("Human:", "Assistant:")):  # some copies drop the leading blank line
        text = "\n\n" + text
    parts = _HH_MARKER.split(text)  # [text before the first marker, role, content, role, content, ...]
    if len(parts) == 1:
        raise DataError(src.path, src.line, name, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if parts[0].strip():
        raise DataError(src.path, src.line, name, "has text before the first '\\n\\nHuman:' turn")
    return [Turn(_HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])]


def _check_hh_prompt(turns: list[Turn], src: Source, name: str) -> tuple[Turn, ...]:
    _require_user_turn(tuple(turns), src, name, "(Human:) before the final Assistant turn")
    for i, turn in enumerate(turns, start=1):
        if not turn.content:
            speaker = "Human" if turn.role == "user" else "Assistant"
            raise DataError(src.path, src.line, name, f"turn {i} ({speaker}) is empty")
    return tuple(turns)


def _hh_dialogue(obj: dict, key: str, src: Source) -> tuple[tuple[Turn, ...], str]:
    """`(prompt turns, final assistant text)` of one whole hh-rlhf dialogue."""
    turns = _hh_turns(_text(obj, key, src), src, key)
    if turns[-1].role != "assistant":
        raise DataError(src.path, src.line, key, "the dialogue must end with an '\\n\\nAssistant:' turn (the response)")
    if not turns[-1].content:
        raise DataError(src.path, src.line, key, "the final Assistant response is empty")
    return _check_hh_prompt(turns[:-1], src, key), turns[-1].content


def _parse_hh_rlhf(obj: dict, src: Source) -> PreferenceSample:
    prompt, chosen = _hh_dialogue(obj, "chosen", src)
    rejected_prompt, rejected = _hh_dialogue(obj, "rejected", src)
    if rejected_prompt != prompt:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt, rejected_prompt)) if a != b),
            min(len(prompt), len(rejected_prompt)),
        )
        message = f"the dialogue before the final Assistant turn differs from 'chosen' at turn {turn + 1}; both must share one prompt"
        raise DataError(src.path, src.line, "rejected", message)
    return PreferenceSample(prompt, chosen, rejected, source=src)


def _parse_rm_static(obj: dict, src: Source) -> PreferenceSample:
    turns = _hh_turns(_text(obj, "prompt", src), src, "prompt")
    if turns[-1].role != "assistant" or turns[-1].content:
        message = "must end with an empty '\\n\\nAssistant:' turn for the response to follow"
        raise DataError(src.path, src.line, "prompt", message)
    prompt = _check_hh_prompt(turns[:-1], src, "prompt")
    _text(obj, "response", src)
    chosen, rejected = _text(obj, "chosen", src).strip(), _text(obj, "rejected", src).strip()
    return PreferenceSample(prompt, chosen, rejected, source=src)


def _response_id(obj: dict, key: str, src: Source) -> int:
    value = _get(obj, key, src)
    if isinstance(value, bool) or value not in (0, 1):
        raise DataError(src.path, src.line, key, f"must be 0 or 1, got {value!r}")
    return int(value)


def _parse_pku_saferlhf(obj: dict, src: Source, *, pku_preference: str = "better") -> PreferenceSample:
    """PKU-SafeRLHF: `pku_preference` picks whether the more helpful ('better') or the safer response is chosen."""
    if pku_preference not in ("better", "safer"):
        raise ConfigError(f"pku_preference must be 'better' or 'safer', got {pku_preference!r}")
    prompt = _user(_text(obj, "prompt", src))
    responses = (_text(obj, "response_0", src), _text(obj, "response_1", src))
    ids = {key: _response_id(obj, key, src) for key in ("better_response_id", "safer_response_id")}
    chosen = ids[f"{pku_preference}_response_id"]
    return PreferenceSample(prompt, responses[chosen], responses[1 - chosen], source=src)


# ---- prompt-only schemas ----


def _columns(obj: dict, prompt_key: str) -> dict:
    """The record's fields other than the prompt, kept for reward functions (`PromptSample.columns`)."""
    return {k: v for k, v in obj.items() if k != prompt_key}


def _parse_prompt_only(obj: dict, src: Source) -> PromptSample:
    return PromptSample(_user(_text(obj, "prompt", src)), src, _columns(obj, "prompt"))


def _parse_prompt_messages(obj: dict, src: Source) -> PromptSample:
    turns = _turns(obj, "messages", src)
    last = len(turns) - 1
    if turns[last].role == "assistant":
        message = "the last message of a prompt must not be 'assistant': the policy writes that turn"
        raise DataError(src.path, src.line, f"messages[{last}].role", message)
    _require_user_turn(turns, src, "messages", "in a prompt")
    return PromptSample(turns, src, _columns(obj, "messages"))


# ---- the registry ----


@dataclass
class Schema:
    """One record format and how it becomes a typed sample."""

    name: str
    """Registry key; what `read_dataset(schema=...)` takes."""
    kind: str
    """'sft', 'preference' or 'prompt': which sample type `parse` returns."""
    required: tuple[str, ...]
    """Top-level keys every record has; detection picks the schema whose keys a record contains."""
    parse: Callable[[dict, Source], Sample]
    """Record -> sample, raising DataError; reader options named in `options` arrive as keyword arguments."""
    optional: tuple[str, ...] = ()
    """Keys read when present; listed in error messages only."""
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Reader options `parse` accepts: name -> allowed values, the first being the default."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schema '{self.name}': kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.required:
            raise ValueError(f"schema '{self.name}' needs at least one required key, or it would match any record")
        self.required = tuple(self.required)

    def describe(self) -> str:
        """`name {key, key, [optional]}`, as listed in detection errors."""
        keys = [*self.required, *(f"[{k}]" for k in self.optional)]
        return f"{self.name} {{{', '.join(keys)}}}"


SCHEMAS: dict[str, Schema] = {}


def register_schema(schema: Schema) -> None:
    """Add a schema to `SCHEMAS` so detection and `read_dataset(schema=name)` know it; names are unique."""
    if schema.name in SCHEMAS:
        raise ValueError(f"schema '{schema.name}' is already registered ({SCHEMAS[schema.name].describe()})")
    SCHEMAS[schema.name] = schema


for _schema in (
    Schema("prompt_response", "sft", ("prompt", "response"), _parse_prompt_response),
    Schema("alpaca", "sft", ("instruction", "output"), _parse_alpaca, optional=("input",)),
    Schema("messages", "sft", ("messages",), _parse_messages_sft),
    Schema(
        "prompt_chosen_rejected",
        "preference",
        ("prompt", "chosen", "rejected"),
        _parse_prompt_chosen_rejected,
        optional=("margin",),
    ),
    Schema("hh_rlhf", "preference", ("chosen", "rejected"), _parse_hh_rlhf),
    Schema("rm_static", "preference", ("prompt", "response", "chosen", "rejected"), _parse_rm_static),
    Schema(
        "pku_saferlhf",
        "preference",
        ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id"),
        _parse_pku_saferlhf,
        options={"pku_preference": ("better", "safer")},
    ),
    Schema("prompt_only", "prompt", ("prompt",), _parse_prompt_only),
    Schema("prompt_messages", "prompt", ("messages",), _parse_prompt_messages),
):
    register_schema(_schema)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def detect_schema(obj: dict, kind: str, source: Source | None = None) -> Schema:
    """The `kind` schema whose required keys `obj` has; the most specific one when they nest (rm_static > hh_rlhf)."""
    _check_kind(kind)
    src = source or Source("<record>")
    candidates = [s for s in SCHEMAS.values() if s.kind == kind]
    matches = [s for s in candidates if all(k in obj for k in s.required)]
    best = [s for s in matches if all(set(s.required) >= set(other.required) for other in matches)]
    if len(best) == 1:
        return best[0]
    if matches:
        names = "; ".join(s.describe() for s in matches)
        message = f"record matches several {kind} schemas ({names}); pass schema=<name> or drop the extra keys"
        raise DataError(src.path, src.line, None, message)
    keys = ", ".join(sorted(obj)[:12]) + (", ..." if len(obj) > 12 else "")
    expected = "; ".join(s.describe() for s in candidates)
    raise DataError(
        src.path, src.line, None, f"record keys {{{keys}}} match no {kind} schema; expected one of: {expected}"
    )


def _schema_by_name(name: str, kind: str) -> Schema:
    if name not in SCHEMAS:
        known = ", ".join(s.name for s in SCHEMAS.values() if s.kind == kind)
        raise ConfigError(f"unknown data schema '{name}'; {kind} schemas are: {known}")
    schema = SCHEMAS[name]
    if schema.kind != kind:
        raise ConfigError(f"data schema '{name}' reads {schema.kind} data, but {kind} data was asked for")
    return schema


def _check_options(kind: str, options: dict[str, object]) -> None:
    known: dict[str, tuple[str, ...]] = {}
    for schema in SCHEMAS.values():
        if schema.kind == kind:
            known.update(schema.options)
    for name, value in options.items():
        if name not in known:
            raise ConfigError(f"unknown {kind} reader option '{name}'; known options: {', '.join(known) or 'none'}")
        if value not in known[name]:
            raise ConfigError(f"reader option {name}={value!r}; expected one of {', '.join(known[name])}")


# ---- reading a dataset ----


@dataclass
class ReadResult:
    """The samples of one file, the schema that read them and counts worth logging."""

    samples: list
    """SFTSample, PreferenceSample or PromptSample, in file order."""
    schema: str
    """Name of the schema used (given or detected)."""
    stats: dict[str, int]
    """'records'; for preference data also 'chosen_equals_rejected'."""


def read_dataset(path: str, kind: str, schema: str | None = None, **options: str) -> ReadResult:
    """Read every record of `path` into `kind` samples: with `schema` given, every record must fit it; else each
    record's schema is detected from its keys (files may mix, e.g. prompt/response and messages lines).

    `options` are reader options of the kind's schemas, e.g. `pku_preference='safer'`.
    """
    path = str(path)
    _check_kind(kind)
    _check_options(kind, options)
    fixed = None if schema is None else _schema_by_name(schema, kind)
    used: set[str] = set()
    unit = _UNITS.get(Path(path).suffix.lower(), "line")
    samples: list[Sample] = []
    equal: list[int] = []
    for n, obj in iter_records(path):
        src = Source(path, n)
        try:
            chosen_schema = fixed or detect_schema(obj, kind, src)
            missing = [k for k in chosen_schema.required if k not in obj]
            if missing:
                message = f"is missing; schema '{chosen_schema.name}' (data.schema) needs keys {', '.join(chosen_schema.required)}"
                raise DataError(path, n, missing[0], message)
            used.add(chosen_schema.name)
            parse_options = {k: v for k, v in options.items() if k in chosen_schema.options}
            sample = chosen_schema.parse(obj, src, **parse_options)
        except DataError as e:
            if unit == "line":
                raise
            raise DataError(e.path, e.line, e.field, f"{e.message} ({unit} {e.line} of the file)") from e
        if not isinstance(sample, _SAMPLE_TYPES[kind]):
            raise TypeError(f"schema '{chosen_schema.name}' returned {type(sample).__name__}, not a {kind} sample")
        if kind == "preference" and sample.chosen.strip() == sample.rejected.strip():
            equal.append(n)
        samples.append(sample)

    stats = {"records": len(samples)}
    if kind == "preference":
        stats["chosen_equals_rejected"] = len(equal)
        if equal:
            message = (
                f"{path}: {len(equal)} of {len(samples)} records have chosen == rejected (after stripping), "
                f"first at {unit} {equal[0]}; kept, but they carry no preference signal"
            )
            warnings.warn(message, stacklevel=2)
    return ReadResult(samples, used.pop() if len(used) == 1 else "mixed:" + ",".join(sorted(used)), stats)
