"""`mrlhf serve` end to end: a real server on 127.0.0.1 (PP1 in one process, PP2 on two gloo ranks), real HTTP
clients (httpx and the official openai client). Greedy answers equal `mrlhf generate` on the same checkpoint;
malformed requests (hand-written and OpenAPI-driven) get 4xx and never desync the ranks; 64 concurrent clients
get identical greedy answers; streams concatenate to the plain answer; a disconnect frees its slot; the API key
guards every route but /health; SIGTERM drains and every rank exits 0."""

import asyncio
import json
import math
import statistics
import time

import httpx
import pytest
from harness import run_ranks
from serving_cases import cases
from serving_runs import CONTEXT, PROMPTS, Server, checkpoint_rank, generate, raw_request

KEY = "test-key"
MAX_NEW = 8  # the PP2 server's --max-tokens: the OpenAPI fuzzer's valid requests stay short
FINISH = {"eos": "stop", "length": "length", "stop_string": "stop"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def ckpt(tmp):
    (path,) = run_ranks(checkpoint_rank, 1, str(tmp))
    return path


@pytest.fixture(scope="module")
def reference(ckpt, tmp):
    """`mrlhf generate` of PROMPTS, greedy, at PP1 and PP2 (the CLI itself, on forked ranks)."""
    ref = {"pp1": generate(ckpt, str(tmp), {}, MAX_NEW), "pp2": generate(ckpt, str(tmp), {"pp": 2}, MAX_NEW)}
    assert [r["tokens"] for r in ref["pp1"]] == [r["tokens"] for r in ref["pp2"]]
    return ref


@pytest.fixture(scope="module")
def pp1(ckpt, tmp):
    server = Server(ckpt, str(tmp), {}, ["--max-running", "8"], KEY)
    yield server
    assert server.stop() == [0]  # (already stopped by the drain test; this covers a run that skipped it)


@pytest.fixture(scope="module")
def pp2(ckpt, tmp):
    flags = ["--max-running", "8", "--max-queue", "40", f"--max-tokens={MAX_NEW}"]
    server = Server(ckpt, str(tmp), {"pp": 2}, flags, KEY)
    yield server
    assert server.stop() == [0, 0]


def chat(c: httpx.Client, prompt: str, **kw) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": MAX_NEW} | kw  # fmt: skip
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def complete(c: httpx.Client, prompt, **kw) -> dict:
    r = c.post(
        "/v1/completions", json={"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": MAX_NEW} | kw
    )
    assert r.status_code == 200, r.text
    return r.json()


def text_of(choice: dict) -> str:
    return choice["text"] if "text" in choice else choice["message"]["content"]


def rendered(prompt: str) -> str:
    """The text `mrlhf generate` feeds the model for {"prompt": ...}: the checkpoint's (plain) chat template."""
    from mrlhf.data.records import Turn
    from mrlhf.data.templates import get_template

    return get_template("plain").render_prompt([Turn("user", prompt)])


@pytest.mark.parametrize("name", ["pp1", "pp2"])
def test_greedy_answers_equal_mrlhf_generate(request, reference, name):
    server = request.getfixturevalue(name)
    with server.client() as c:
        for prompt, ref in zip(PROMPTS, reference[name]):
            out = chat(c, prompt, logprobs=True)
            choice = out["choices"][0]
            assert choice["message"]["content"] == ref["response"], prompt
            assert choice["finish_reason"] == FINISH[ref["finish_reason"]]
            assert out["usage"]["completion_tokens"] == len(ref["tokens"])  # a stop token is counted, not shown
            server_lps = [e["logprob"] for e in choice["logprobs"]["content"]]
            ref_lps = ref["logprobs"][: len(ref["tokens"]) - (ref["finish_reason"] == "eos")]
            assert len(server_lps) == len(ref_lps) and max(abs(a - b) for a, b in zip(server_lps, ref_lps)) <= 1e-4
            # the same model input as raw text through /v1/completions (no template there)
            assert complete(c, rendered(prompt))["choices"][0]["text"] == ref["response"]
        batch = complete(c, [rendered(p) for p in PROMPTS])  # a batch of prompts, generated side by side
        assert [ch["text"] for ch in sorted(batch["choices"], key=lambda ch: ch["index"])] == [
            r["response"] for r in reference[name]
        ]


def test_official_openai_client(pp2, reference):
    from openai import OpenAI

    client = OpenAI(base_url=pp2.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    ref = reference["pp2"][0]["response"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_NEW)
    assert out.choices[0].message.content == ref and out.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_NEW,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    comp = client.completions.create(model="tiny", prompt=rendered(PROMPTS[0]), temperature=0, max_tokens=MAX_NEW)
    assert comp.choices[0].text == ref
    streamed = client.completions.create(model="tiny", prompt=rendered(PROMPTS[0]), temperature=0,
                                         max_tokens=MAX_NEW, stream=True)  # fmt: skip
    assert "".join(ch.choices[0].text for ch in streamed) == ref


def sse(c: httpx.Client, path: str, body: dict) -> list[dict]:
    with c.stream("POST", path, json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_chunks_concatenate_to_the_plain_answer(pp1, path):
    """Sampled with a seed (n=2, top-p, logprobs): streamed and plain answers are the same sample; a stop string
    cuts both where it first appears."""
    prompt = {"prompt": rendered(PROMPTS[1])} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": PROMPTS[1]}]}  # fmt: skip
    lp = {"logprobs": 2} if path == "/v1/completions" else {"logprobs": True, "top_logprobs": 2}
    body = {"model": "tiny", "n": 2, "temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 24,
            "ignore_eos": True} | prompt | lp  # fmt: skip
    with pp1.client() as c:
        plain = c.post(path, json=body).json()
        texts = {ch["index"]: text_of(ch) for ch in plain["choices"]}
        assert len(texts) == 2 and all(len(t) > 4 for t in texts.values())
        stop = texts[0][2:4]
        for extra in ({}, {"stop": [stop]}):
            plain = c.post(path, json=body | extra).json()
            chunks = sse(c, path, body | extra | {"stream_options": {"include_usage": True}})
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
            for ch in plain["choices"]:
                i = ch["index"]
                mine = [x["choices"][0] for x in chunks[:-1] if x["choices"][0]["index"] == i]
                text = "".join(x.get("text", x.get("delta", {}).get("content", "")) or "" for x in mine)
                assert text == text_of(ch) and mine[-1]["finish_reason"] == ch["finish_reason"]
                lps = [x["logprobs"] for x in mine if x["logprobs"]]
                if path == "/v1/completions":
                    assert sum((x["token_logprobs"] for x in lps), []) == ch["logprobs"]["token_logprobs"]
                else:
                    assert sum((x["content"] for x in lps), []) == ch["logprobs"]["content"]
            if extra:  # choice 0 held the stop string: cut before its first appearance
                cut = next(ch for ch in plain["choices"] if ch["index"] == 0)
                assert cut["finish_reason"] == "stop" and text_of(cut) == texts[0][: texts[0].find(stop)]


def wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def test_client_disconnect_frees_its_slot(pp1):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT - 8, "ignore_eos": True, "temperature": 0}
    before = pp1.metric("mrlhf_requests_cancelled_total", 'reason="disconnect"')
    generated = pp1.metric("mrlhf_generated_tokens_total")
    with pp1.client() as c, c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert pp1.metric("mrlhf_running_slots") == 1
    wait_for(lambda: pp1.metric("mrlhf_running_slots") == 0)
    assert pp1.metric("mrlhf_requests_cancelled_total", 'reason="disconnect"') == before + 1
    assert pp1.metric("mrlhf_generated_tokens_total") - generated < CONTEXT - 8  # stopped early
    generated = pp1.metric("mrlhf_generated_tokens_total")
    with pp1.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        c.post("/v1/completions", json=body)
    wait_for(lambda: pp1.metric("mrlhf_requests_cancelled_total", 'reason="disconnect"') == before + 2)
    wait_for(lambda: pp1.metric("mrlhf_running_slots") == 0)
    assert pp1.metric("mrlhf_generated_tokens_total") - generated < CONTEXT - 8


def test_every_route_but_health_needs_the_key(pp1):
    spec = httpx.get(pp1.url + "/openapi.json", headers=pp1.headers).json()
    routes = [(m.upper(), p.replace("{model}", "tiny")) for p, ops in spec["paths"].items() for m in ops]
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= set(routes)
    routes += [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/v1/nope"), ("POST", "/v1/nope")]
    for method, path in routes:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
        ):
            r = httpx.request(method, pp1.url + path, headers=headers, json={"model": "tiny", "prompt": "hi"})
            if path == "/health":
                assert r.status_code == 200
            else:
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"


def check_error(r: httpx.Response, why: str) -> None:
    assert 400 <= r.status_code < 500, (why, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), why
    assert set(err) == {"message", "type", "param", "code"}, why


def test_malformed_requests_get_4xx_and_leave_every_rank_alive(pp2):
    with pp2.client() as c:
        before = chat(c, PROMPTS[2])["choices"][0]["message"]["content"]
        generated = pp2.metric("mrlhf_generated_tokens_total")
        statuses = {}
        for method, path, headers, raw, why in cases():
            if "Content-Length" in headers:  # a lying length: httpx would refuse to send it
                status, content = raw_request(pp2.url, method, path, headers | pp2.headers, raw)
                r = httpx.Response(status, content=content)
            else:
                r = c.request(method, path, headers=headers, content=raw)
            check_error(r, why)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert sum(statuses.values()) >= 500 and {400, 404, 405, 413, 415} <= set(statuses)
        assert pp2.metric("mrlhf_generated_tokens_total") == generated  # nothing reached the engine
        assert c.get("/health").status_code == 200
        assert chat(c, PROMPTS[2])["choices"][0]["message"]["content"] == before


def fuzz_operation(server: Server, op, mode, seen: dict) -> None:
    """``max_examples`` schemathesis cases of one operation in one generation mode, each sent for real."""
    import hypothesis
    from schemathesis.generation.modes import GenerationMode

    @hypothesis.settings(max_examples=30, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])  # fmt: skip
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        r = case.call(base_url=server.url, headers=server.headers, timeout=60)
        assert r.status_code < 500, (case.body, r.status_code, r.text[:300])
        if r.status_code == 200:
            assert mode == GenerationMode.POSITIVE, ("accepted a schema-violating body", case.body)
            seen["ok"] += 1
        else:
            check_error(httpx.Response(r.status_code, content=r.content), repr(case.body)[:200])
            assert mode == GenerationMode.NEGATIVE or r.status_code == 400, (case.body, r.text)
            seen["rejected"] += 1

    run()


def test_openapi_fuzzer_finds_no_server_error(pp2):
    """Schemathesis drives both generation routes from /openapi.json: schema-valid bodies get 200 or a 400 the schema
    cannot express (context, vocabulary), schema-violating ones get 4xx; never a 5xx, always OpenAI's error shape."""
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(pp2.url + "/openapi.json", headers=pp2.headers)
    seen = {"ok": 0, "rejected": 0}
    with pp2.client() as c:
        before = chat(c, PROMPTS[3])["choices"][0]["message"]["content"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(pp2, schema[path]["POST"], mode, seen)
    print(f"\n[serving fuzz] schemathesis: {seen['ok']} answered, {seen['rejected']} rejected")
    assert seen["ok"] > 0 and seen["rejected"] > 0, seen
    with pp2.client() as c:
        assert c.get("/health").status_code == 200
        assert chat(c, PROMPTS[3])["choices"][0]["message"]["content"] == before


def test_64_concurrent_clients_x_4_requests(pp2):
    """Every request answered (200, or 429 with Retry-After), every 200 equal to the same request alone."""
    prompts = [rendered(p) for p in PROMPTS[:4]]
    with pp2.client() as c:
        alone = {p: complete(c, p, max_tokens=4)["choices"][0]["text"] for p in prompts}

    async def client(i: int, results: list) -> None:
        async with httpx.AsyncClient(base_url=pp2.url, headers=pp2.headers, timeout=120) as ac:
            for j in range(4):
                p = prompts[(i + j) % len(prompts)]
                start = time.perf_counter()
                r = await ac.post("/v1/completions", json={"model": "tiny", "prompt": p, "temperature": 0,
                                                           "max_tokens": 4})  # fmt: skip
                results.append((p, r.status_code, r.headers.get("retry-after"), r.json(), time.perf_counter() - start))

    async def main() -> list:
        results: list = []
        await asyncio.gather(*(client(i, results) for i in range(64)))
        return results

    results = asyncio.run(main())
    assert len(results) == 256
    ok = [r for r in results if r[1] == 200]
    for p, status, retry, body, _ in results:
        assert status in (200, 429), (status, body)
        if status == 429:
            assert retry is not None and int(retry) >= 1 and body["error"]["code"] == "rate_limit_exceeded"
        else:
            assert body["choices"][0]["text"] == alone[p]
    lat = sorted(r[4] for r in ok)
    p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)]
    print(f"\n[serving load] 64 clients x 4: {len(ok)} x 200, {len(results) - len(ok)} x 429; "
          f"latency p50 {statistics.median(lat) * 1e3:.0f} ms p99 {p99 * 1e3:.0f} ms")  # fmt: skip
    assert len(ok) >= 64
    assert httpx.get(pp2.url + "/health").status_code == 200
    assert pp2.metric("mrlhf_running_slots") == 0 and pp2.metric("mrlhf_queue_depth") == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(pp1):
    """SIGTERM: /health and new requests get 503 while the in-flight stream runs to its end; then the process exits 0."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT - 8, "ignore_eos": True, "temperature": 0}
    with pp1.client() as c, c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        pp1.sigterm()
        wait_for(lambda: httpx.get(pp1.url + "/health").status_code == 503)
        late = httpx.post(pp1.url + "/v1/completions", json=body, headers=pp1.headers)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert pp1.stop() == [0]


def test_sigterm_at_pp2_finishes_the_stream_and_both_ranks_exit_0(pp2):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": MAX_NEW, "ignore_eos": True, "temperature": 0}
    with pp2.client() as c, c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        pp2.sigterm()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert pp2.stop() == [0, 0]
