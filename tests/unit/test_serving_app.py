"""The HTTP front end on a fake engine (no model, no process group), in process through httpx's ASGI transport:
OpenAI response and stream shapes, 429 with Retry-After, deadlines, engine aborts, the gate (key, content type,
body size, draining), metrics and the published OpenAPI limits."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx

import mrlhf
from mrlhf.data.templates import get_template
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.serving.engine import EngineBusy, TokenEvent
from mrlhf.serving.protocol import ModelCard
from mrlhf.serving.server import ServerSettings, ServerState, build_app

TOK = Tokenizer.load(str(Path(mrlhf.__file__).parent / "assets" / "demo" / "tokenizer.model"))
ANSWER = TOK.encode("7 + 5 = 12.")


class FakeEngine:
    """The rank-0 face of ServingEngine: each choice emits ANSWER (then eos) from a thread, or nothing (``hang``)."""

    def __init__(self, max_queue: int = 4, hang: bool = False, abort: bool = False) -> None:
        self.max_queue, self.hang, self.abort = max_queue, hang, abort
        self.running, self.failure, self.tick, self.generated, self.capacity = True, None, 0, 0, 8
        self.busy_rows = self.queue_depth = 0
        self.cancelled: list[tuple[int, int | None]] = []
        self.live = 0
        self.closed = False

    def submit(self, reqs) -> list[int]:
        if self.closed:
            raise EngineBusy("closing", closed=True)
        if self.live + len(reqs) > self.max_queue:
            raise EngineBusy(f"the wait queue is full ({self.max_queue} requests)")
        rids = list(range(self.tick, self.tick + len(reqs)))
        self.tick += len(reqs)
        for rid, req in zip(rids, reqs):
            self.live += 1
            threading.Thread(target=self._emit, args=(rid, req), daemon=True).start()
        return rids

    def _emit(self, rid, req) -> None:
        if self.hang:
            return
        for choice in range(req.n):
            if self.abort:
                req.emit(TokenEvent(rid, choice, -1, 0.0, (), "abort"))
                continue
            ids = (ANSWER + [TOK.eos_id])[: req.max_tokens]
            for j, t in enumerate(ids):
                last = j == len(ids) - 1
                finish = "stop" if t in req.stop_token_ids else "length" if last else None
                top = tuple((t + k, -0.5 - k) for k in range(req.top))
                req.emit(TokenEvent(rid, choice, t, -0.5, top, finish))
                if finish:
                    break
        self.live -= 1

    def cancel(self, rid: int, choice: int | None = None) -> None:
        self.cancelled.append((rid, choice))

    def close(self) -> None:
        self.closed = True


def make(engine=None, **settings):
    engine = engine or FakeEngine()
    card = ModelCard(name="tiny", context=64, vocab_size=TOK.vocab_size, eos_id=TOK.eos_id, bos_id=TOK.bos_id,
                     encode=TOK.encode, template=get_template("plain"), max_choices=8, max_n=4, max_tokens_cap=32)  # fmt: skip
    state = ServerState()
    return build_app(engine, card, TOK.decode, ServerSettings(**settings), state), engine, state


def call(app, *requests):
    """Send (method, path, kwargs) requests concurrently; the responses in order."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            return await asyncio.gather(*(c.request(m, p, **kw) for m, p, kw in requests))

    return asyncio.run(main())


def post(path: str, body: dict, **kw):
    return ("POST", path, {"json": body} | kw)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is 7 + 5?"}]}
COMP = {"model": "tiny", "prompt": "What is 7 + 5?"}


def events(r: httpx.Response) -> list:
    lines = [line for line in r.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and r.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_openai_shapes_plain_and_streamed():
    app, _, _ = make()
    plain, chunks = call(app, post("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 2, "n": 2}),
                         post("/v1/chat/completions", CHAT | {"n": 2, "stream": True, "logprobs": True,
                                                              "stream_options": {"include_usage": True}}))  # fmt: skip
    body = plain.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": "7 + 5 = 12."}] * 2
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == "7 + 5 = 12." and len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert body["usage"]["completion_tokens"] == 2 * (len(ANSWER) + 1)  # eos counted, not shown
    got = events(chunks)
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and got[0]["usage"] is None
    assert got[-1]["choices"] == [] and got[-1]["usage"] == body["usage"]
    for i in (0, 1):
        mine = [c["choices"][0] for c in got[:-1] if c["choices"][0]["index"] == i]
        assert (
            "".join(c["delta"].get("content", "") for c in mine) == "7 + 5 = 12."
            and mine[-1]["finish_reason"] == "stop"
        )
    comp, streamed = call(app, post("/v1/completions", COMP | {"logprobs": 1, "max_tokens": 4}),
                          post("/v1/completions", COMP | {"stream": True, "max_tokens": 4}))  # fmt: skip
    c = comp.json()["choices"][0]
    assert c["finish_reason"] == "length" and c["text"] == TOK.decode(ANSWER[:4])
    assert c["logprobs"]["text_offset"][0] == 0 and len(c["logprobs"]["top_logprobs"][0]) == 1
    assert "".join(x["choices"][0]["text"] for x in events(streamed)) == c["text"]


def test_full_queue_is_429_with_retry_after_and_all_or_nothing():
    app, engine, _ = make(FakeEngine(max_queue=2, hang=True), request_timeout=0.3)
    r, busy = call(app, post("/v1/completions", COMP | {"prompt": ["a", "b"]}),
                   post("/v1/completions", COMP))  # fmt: skip
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"  # the hung engine: deadline
    assert sorted(engine.cancelled) == [(0, None), (1, None)]  # both prompts of the timed-out request freed


def test_deadline_in_a_stream_and_engine_abort():
    app, engine, _ = make(FakeEngine(hang=True), request_timeout=0.2)
    (r,) = call(app, post("/v1/completions", COMP | {"stream": True}))
    assert r.status_code == 200 and events(r)[-1]["error"]["code"] == "request_timeout" and engine.cancelled
    app, _, _ = make(FakeEngine(abort=True))
    plain, streamed = call(app, post("/v1/completions", COMP), post("/v1/completions", COMP | {"stream": True}))
    assert plain.status_code == 503 and events(streamed)[-1]["error"]["type"] == "service_unavailable"


def test_gate_key_content_type_size_and_draining():
    app, _, state = make(api_key="sekrit", max_body_bytes=200)
    ok = {"Authorization": "Bearer sekrit"}
    rs = call(app, ("GET", "/health", {}), ("GET", "/v1/models", {}), ("GET", "/nowhere", {}),
              ("GET", "/v1/models", {"headers": {"Authorization": "Bearer nope"}}),
              ("GET", "/v1/models", {"headers": {"Authorization": "bearer sekrit"}}),
              ("POST", "/v1/completions", {"content": json.dumps(COMP), "headers": ok | {"Content-Type": "text/plain"}}),
              ("POST", "/v1/completions", {"json": COMP | {"user": "x" * 300}, "headers": ok}),
              ("POST", "/v1/completions", {"content": b"{" * 300, "headers": ok | {"Content-Type": "application/json"}}),
              ("GET", "/v1/completions", {"headers": ok}), ("GET", "/v1/models/other", {"headers": ok}))  # fmt: skip
    assert [r.status_code for r in rs] == [200, 401, 401, 401, 200, 415, 413, 413, 405, 404]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in rs[1:4] + rs[5:])
    state.draining = True
    health, late = call(app, ("GET", "/health", {}), post("/v1/completions", COMP, headers=ok))
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"


def test_metrics_and_openapi_limits():
    app, _, _ = make()
    call(app, post("/v1/completions", COMP), ("GET", "/a/b/c", {}), ("GET", "/x/y", {}))
    (m,) = call(app, ("GET", "/metrics", {}))
    text = m.text
    for family in ("mrlhf_requests_total", "mrlhf_queue_depth", "mrlhf_running_slots", "mrlhf_generated_tokens_total",
                   "mrlhf_time_to_first_token_seconds_bucket", "mrlhf_request_latency_seconds_bucket"):  # fmt: skip
        assert family in text, family
    assert 'route="other",status="404"} 2.0' in text and 'route="/v1/completions",status="200"} 1.0' in text
    (spec,) = call(app, ("GET", "/openapi.json", {}))
    schemas = spec.json()["components"]["schemas"]
    comp = schemas["CompletionBody"]["properties"]
    assert comp["model"] == {"type": "string", "enum": ["tiny"]}
    assert comp["max_tokens"]["anyOf"][0]["maximum"] == 32 and comp["n"]["anyOf"][0]["maximum"] == 4
    assert comp["prompt"]["anyOf"][2]["items"]["maximum"] == TOK.vocab_size - 1
    assert "ChatMessage" in schemas and "requestBody" in spec.json()["paths"]["/v1/chat/completions"]["post"]


def test_not_ready_is_503():
    engine = FakeEngine()
    engine.running = False
    app, _, _ = make(engine)
    health, r = call(app, ("GET", "/health", {}), post("/v1/completions", COMP))
    assert health.json() == {"status": "loading"} and r.status_code == 503
