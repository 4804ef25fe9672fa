"""Hand-written malformed requests for the serving fuzz test: each one must get a 4xx with OpenAI's error shape.

A case is (method, path, headers, body bytes, why). Bodies are raw bytes so that broken JSON, invalid UTF-8 and
lying Content-Length headers reach the server exactly as written.
"""

from __future__ import annotations

import json

JSON = {"Content-Type": "application/json"}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

# (field, wrong value) pairs valid JSON but out of the schema, for either endpoint
COMMON_BAD = [
    ("model", None), ("model", 5), ("model", ["tiny"]), ("model", "tiny\x00"), ("model", "other-model"),
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**30), ("max_tokens", 1.5), ("max_tokens", "8"),
    ("max_tokens", True), ("max_tokens", 2**63), ("max_tokens", 100_000), ("max_tokens", 1e400),
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"), ("temperature", 1e308), ("temperature", []),
    ("temperature", True), ("top_p", 0), ("top_p", -1), ("top_p", 1.5), ("top_p", "0.9"), ("top_p", {}),
    ("top_k", -2), ("top_k", 0.5), ("top_k", "5"), ("n", 0), ("n", -1), ("n", 65), ("n", 10**10), ("n", 1.5),
    ("n", "2"), ("n", 16), ("stop", 5), ("stop", ""), ("stop", [""]), ("stop", [1, 2]), ("stop", ["a"] * 17),
    ("stop", {"a": 1}), ("stop", "\x00"), ("stop", "\ud800"), ("stop_token_ids", [-1]), ("stop_token_ids", [10**9]),
    ("stop_token_ids", "1"), ("stop_token_ids", [1.5]), ("seed", 2**70), ("seed", -(2**70)), ("seed", 1.5),
    ("seed", "42"), ("stream", "yes"), ("stream", 1), ("stream_options", {"include_usage": True}),
    ("stream_options", True), ("stream_options", {"include_usage": "yes"}), ("stream_options", {"other": True}),
    ("ignore_eos", "true"), ("presence_penalty", 1.0), ("presence_penalty", 3), ("frequency_penalty", -0.5),
    ("frequency_penalty", "0"), ("logit_bias", {"5": 100}), ("logit_bias", []), ("user", 5), ("user", "u\x00"),
    ("unknown_field", 1), ("tools", [{"type": "function"}]), ("functions", []), ("max_completion_tokens_x", 5),
]  # fmt: skip

COMPLETION_BAD = [
    ("prompt", ""), ("prompt", []), ("prompt", [[]]), ("prompt", [""]), ("prompt", None), ("prompt", 5),
    ("prompt", [1, "a"]), ("prompt", [[1], "a"]), ("prompt", [-1, 2]), ("prompt", [10**9]), ("prompt", [[10**9]]),
    ("prompt", [[[1]]]), ("prompt", {"text": "hi"}), ("prompt", "a\x00b"), ("prompt", "\ud800"),
    ("prompt", "\udfff tail"), ("prompt", [1.5]), ("prompt", [True]), ("prompt", "word " * 3000),
    ("prompt", [5] * 3000), ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", "1"),
    ("echo", True), ("echo", "no"), ("suffix", "end"), ("suffix", 5), ("best_of", 2), ("best_of", 0),
    ("top_logprobs", 2), ("messages", [{"role": "user", "content": "hi"}]),
]  # fmt: skip

_MSG = {"role": "user", "content": "hi"}
CHAT_BAD = [
    ("messages", []), ("messages", None), ("messages", "hi"), ("messages", [{}]), ("messages", [{"role": "user"}]),
    ("messages", [{"content": "hi"}]), ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [{"role": "function", "content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": None}]), ("messages", [{"role": "user", "content": [{"type": "image"}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("messages", [{"role": "user", "content": "a\x00"}]), ("messages", [{"role": "user", "content": "\ud83d"}]),
    ("messages", [_MSG, {"role": "assistant", "content": "ok"}]), ("messages", [{"role": 1, "content": "hi"}]),
    ("messages", [{"role": "user", "content": "hi", "extra": 1}]), ("messages", [_MSG, 5]), ("messages", [[_MSG]]),
    ("messages", [{"role": "user", "content": "word " * 3000}]), ("messages", {"role": "user", "content": "hi"}),
    ("logprobs", 1), ("logprobs", "true"), ("top_logprobs", 21), ("top_logprobs", -1), ("top_logprobs", 3),
    ("max_completion_tokens", 0), ("max_completion_tokens", "5"), ("max_completion_tokens", 10**6),
    ("response_format", {"type": "json_object"}), ("response_format", "text"), ("tool_choice", "auto"),
    ("prompt", "hi"),
]  # fmt: skip

BROKEN_JSON = [
    b"", b" ", b"{", b"}", b"{'model': 'tiny'}", b'{"model": "tiny",}', b'{"model": tiny}', b'{"model": "tiny"} x',
    b'{"model": "tiny" "prompt": "x"}', b"[", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": NaN}', b"/* c */ {}", b'{"model": "\\x41"}', b'{"model": "\\u12"}',
    b'\xff\xfe{\x00}\x00', b'{"model": "ti\xffny", "prompt": "x"}', b'{"prompt": "\xc3\x28"}', b"\xef\xbb\xbf{}",
    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"\x00", b'"\x00"', b"nul",
    b'{"model": "tiny", "prompt": "x"}\x00',
]  # fmt: skip

NOT_OBJECTS = [b"[]", b"1", b"-0.5", b'"tiny"', b"null", b"true", b"false", b'[{"model": "tiny"}]', b"[1, 2]"]

WRONG_CONTENT_TYPES = [
    {}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"}, {"Content-Type": "application/json; charset=latin-1"},
    {"Content-Type": "application/jsonx"}, {"Content-Type": "json"}, {"Content-Type": "application/xml"},
    {"Content-Type": "text/json"}, {"Content-Type": ""},
]  # fmt: skip


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


def valid(path: str) -> dict:
    if path == CHAT:
        return {"model": "tiny", "messages": [dict(_MSG)], "max_tokens": 2}
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def cases() -> list[tuple[str, str, dict, bytes, str]]:
    out: list[tuple[str, str, dict, bytes, str]] = []
    for path, specific in ((COMPLETIONS, COMPLETION_BAD), (CHAT, CHAT_BAD)):
        for field, value in COMMON_BAD + specific:
            body = valid(path) | {field: value}
            if field == "stream_options" and value == {"include_usage": True}:
                body.pop("stream", None)  # stream_options without stream
            for stream in (False, True):  # a streamed request is validated before its first byte as well
                if stream and field.startswith("stream"):
                    continue
                raw = json.dumps(body | ({"stream": True} if stream else {}), allow_nan=True).encode()
                out.append(("POST", path, JSON, raw, f"{field}={value!r} stream={stream}"[:80]))
        for field in ("model", "prompt" if path == COMPLETIONS else "messages"):
            body = valid(path)
            body.pop(field)
            out.append(("POST", path, JSON, _body(body), f"missing {field}"))
        for raw in BROKEN_JSON + NOT_OBJECTS:
            out.append(("POST", path, JSON, raw, f"body {raw[:30]!r}"))
        for headers in WRONG_CONTENT_TYPES:
            out.append(("POST", path, headers, _body(valid(path)), f"content type {headers}"))
        big = _body(valid(path) | {"user": "x" * (2 << 20)})
        out.append(("POST", path, JSON, big, "2 MiB body"))
        out.append(("POST", path, JSON | {"Content-Length": str(10**9)}, _body(valid(path)), "lying Content-Length"))
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            out.append((method, path, JSON, _body(valid(path)), f"{method} {path}"))
        for i in range(0, 24):  # a valid request with one byte of junk spliced in at different places
            raw = _body(valid(path))
            at = (i * 7) % len(raw)
            out.append(("POST", path, JSON, raw[:at] + b"\x01}" + raw[at:], f"junk at {at}"))
    for path in ("/v1/nope", "/v2/completions", "/v1/completions/x", "/v1/models/other", "/v1/engines", "/"):
        out.append(("GET", path, {}, b"", f"GET {path}"))
        out.append(("POST", path, JSON, _body(valid(COMPLETIONS)), f"POST {path}"))
    for path in ("/v1/models", "/health", "/metrics"):
        out.append(("POST", path, JSON, b"{}", f"POST {path}"))
    return out
