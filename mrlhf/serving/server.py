"""The HTTP front end on global rank 0: FastAPI routes in OpenAI's shapes, a gate in front of them, and a uvicorn
server that drains on SIGTERM.

The gate (a plain ASGI middleware) answers before any route runs: the API key (every path but /health, unknown
paths included, so the route list does not leak), then for generation routes the body size (Content-Length and the
bytes actually read), the content type and the draining state. Routes read the body themselves and validate it
with ``protocol.py``, so every refusal has OpenAI's error shape and a 4xx status -- FastAPI's own 422 never appears.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mrlhf.serving.engine import EngineBusy, ServingEngine
from mrlhf.serving.jobs import Aborted, Deadline, Run, Update, busy_error
from mrlhf.serving.metrics import Metrics
from mrlhf.serving.protocol import (
    APIError,
    ChatBody,
    CompletionBody,
    ModelCard,
    parse_json,
    resolve_chat,
    resolve_completion,
)

GENERATION = ("/v1/completions", "/v1/chat/completions")
ERRORS = {code: {"description": text, "content": {"application/json": {}}} for code, text in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model or path"),
    (408, "the request ran past the server's deadline"), (413, "body too large"), (415, "not application/json"),
    (429, "queue full; retry after Retry-After seconds"), (503, "loading or draining"))}  # fmt: skip


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0  # seconds from arrival to the last byte
    drain_timeout: float = 60.0  # SIGTERM: longest wait for in-flight requests


class ServerState:
    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0  # generation requests being answered


def _error_bytes(err: APIError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    raw = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    return raw, headers + [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]


class Gate:
    """Auth, body limit, content type and drain state, before routing; every request counted by route and status."""

    def __init__(self, app, settings: ServerSettings, state: ServerState, metrics: Metrics) -> None:
        self.app, self.settings, self.state, self.metrics = app, settings, state, metrics
        self.key = None if settings.api_key is None else settings.api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        status = [500]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.monotonic()
        generation = method == "POST" and path in GENERATION
        try:
            headers = dict(scope["headers"])
            err = self._auth(path, headers)
            body = b""
            if err is None and generation:
                err, body = await self._body(headers, receive)
            if err is None and generation and self.state.draining:
                err = APIError(503, "the server is draining; retry on another replica", "service_unavailable",
                               code="draining")  # fmt: skip
            if err is not None:
                raw, hdrs = _error_bytes(err)
                await counted({"type": "http.response.start", "status": err.status, "headers": hdrs})
                await counted({"type": "http.response.body", "body": raw})
                return
            if not generation:
                return await self.app(scope, receive, counted)
            self.state.inflight += 1
            try:
                await self.app(scope, _replay(body, receive), counted)
            finally:
                self.state.inflight -= 1
        finally:
            route = Metrics.route(path)
            self.metrics.requests.labels(route, str(status[0])).inc()
            if generation and status[0] == 200:
                self.metrics.latency.labels(route).observe(time.monotonic() - start)

    def _auth(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if self.key is None or path == "/health":
            return None
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):  # the scheme is case-blind
            return None
        what = "No API key provided" if not given else "Incorrect API key provided"
        return APIError(401, f"{what}; pass 'Authorization: Bearer <key>'", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def _body(self, headers: dict[bytes, bytes], receive) -> tuple[APIError | None, bytes]:
        limit = self.settings.max_body_bytes
        media = headers.get(b"content-type", b"").decode("latin-1").lower().split(";")
        charset = [p.strip() for p in media[1:] if p.strip().startswith("charset=")]
        if media[0].strip() != "application/json" or any(
            c not in ("charset=utf-8", 'charset="utf-8"') for c in charset
        ):
            return APIError(415, "Content-Type must be application/json (UTF-8)", code="unsupported_media_type"), b""
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return APIError(400, "Content-Length is not a number", code="invalid_header"), b""
            if int(declared) > limit:
                return APIError(413, f"request body is over {limit} bytes", code="request_too_large"), b""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return APIError(400, "client disconnected", code="disconnected"), b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return APIError(413, f"request body is over {limit} bytes", code="request_too_large"), b""
            chunks.append(chunk)
            if not message.get("more_body", False):
                return None, b"".join(chunks)


def _replay(body: bytes, receive):
    """The body the gate read, then the client's own messages (a later http.disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def build_app(engine: ServingEngine, card: ModelCard, decode, settings: ServerSettings,
              state: ServerState | None = None) -> FastAPI:  # fmt: skip
    """The app for ``card`` on ``engine``; ``decode`` is the tokenizer's ids -> text."""
    state = state or ServerState()
    metrics = Metrics(engine)
    app = FastAPI(title="mrlhf serve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.serving, app.state.metrics = state, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # never expected: the fuzz tests count these as failures
        body = APIError(500, f"internal error: {type(e).__name__}", "server_error").body()
        return JSONResponse(body, status_code=500)

    async def generate(request: Request, resolve, route: str):
        arrival = time.monotonic()
        if engine.failure or not engine.running:
            raise APIError(503, "the model is still loading" if not engine.failure else "the engine stopped",
                           "service_unavailable", code="loading")  # fmt: skip
        spec = resolve(parse_json(await request.body()), card)
        run = Run(spec, engine, decode, asyncio.get_running_loop())
        try:
            run.submit()
        except EngineBusy as e:
            raise busy_error(str(e), e.closed) from None
        metrics.prompt_tokens.inc(sum(len(p) for p in spec.prompts))
        deadline = arrival + settings.request_timeout
        if spec.stream:
            return StreamingResponse(stream(run, deadline, arrival, route), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return await collect(request, run, deadline, arrival, route)

    def observe(run: Run, arrival: float, route: str) -> None:
        if run.first_token_at is not None:
            metrics.ttft.labels(route).observe(run.first_token_at - arrival)
        metrics.completion_tokens.inc(sum(c.tokens for c in run.choices))

    async def collect(request: Request, run: Run, deadline: float, arrival: float, route: str):
        async def consume() -> None:
            async for _ in run.updates(deadline):
                pass

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client went away (or this handler was cancelled): free its rows now
                work.cancel()
                run.cancel_unfinished()
                metrics.cancelled.labels("disconnect").inc()
        if not work.done():
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        observe(run, arrival, route)
        exc = work.exception()
        if isinstance(exc, Deadline):
            run.cancel_unfinished()
            metrics.cancelled.labels("deadline").inc()
            raise APIError(408, f"the request did not finish within {settings.request_timeout:g} s", "timeout_error",
                           code="request_timeout")  # fmt: skip
        if isinstance(exc, Aborted):
            raise APIError(503, "the server stopped before the request finished", "service_unavailable")
        if exc is not None:
            raise exc
        return JSONResponse(run.response(card.name))

    async def stream(run: Run, deadline: float, arrival: float, route: str):
        try:
            if run.spec.kind == "chat":
                for c in run.choices:
                    yield _sse(run.chunk(card.name, Update(c.index), role=True))
            pending: list[str] = []
            async for upd in run.updates(deadline):
                if upd.text or upd.entries or upd.finish:
                    pending.append(_sse(run.chunk(card.name, upd)))
                if pending and run.queue.empty():  # one write for the chunks of every event already here
                    yield "".join(pending)
                    pending = []
            if pending:
                yield "".join(pending)
            if run.spec.include_usage:
                yield _sse(run.chunk(card.name, None, usage=True))
        except Deadline:
            run.cancel_unfinished()
            metrics.cancelled.labels("deadline").inc()
            yield _sse(APIError(408, "the request ran past the server's deadline", "timeout_error",
                                code="request_timeout").body())  # fmt: skip
        except Aborted:
            yield _sse(APIError(503, "the server stopped before the request finished", "service_unavailable").body())
        except (asyncio.CancelledError, GeneratorExit):  # the client disconnected mid-stream
            run.cancel_unfinished()
            metrics.cancelled.labels("disconnect").inc()
            raise
        finally:
            observe(run, arrival, route)
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions", openapi_extra=_body("CompletionBody"), responses=ERRORS)
    async def completions(request: Request):
        """OpenAI completions: raw text or token-id prompts (a list of them is a batch), no chat template."""
        return await generate(request, resolve_completion, "/v1/completions")

    @app.post("/v1/chat/completions", openapi_extra=_body("ChatBody"), responses=ERRORS)
    async def chat_completions(request: Request):
        """OpenAI chat completions: the checkpoint's chat template renders the messages."""
        return await generate(request, resolve_chat, "/v1/chat/completions")

    def model_card() -> dict:
        return {"id": card.name, "object": "model", "created": 0, "owned_by": "mrlhf", "max_model_len": card.context}

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", responses=ERRORS)
    async def model(model: str):
        if model != card.name:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health", responses={503: ERRORS[503]})
    async def health():
        """200 when the engine is ticking and the server takes requests; 503 while loading, draining or failed."""
        status = ("failed" if engine.failure else "draining" if state.draining else "ok" if engine.running
                  else "loading")  # fmt: skip
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app, card)
    app.add_middleware(Gate, settings=settings, state=state, metrics=metrics)
    return app


def _body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}  # fmt: skip


def _openapi(app: FastAPI, card: ModelCard) -> dict:
    """FastAPI's schema plus the request bodies (routes read raw bodies) with this server's model and limits."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (CompletionBody, ChatBody):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["model"] = {"type": "string", "enum": [card.name]}
        cap = card.context - 1 if card.max_tokens_cap is None else card.max_tokens_cap
        for key in ("max_tokens", "max_completion_tokens"):
            if key in body["properties"]:
                body["properties"][key] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": cap},
                                                     {"type": "null"}]}  # fmt: skip
        for key, only in (("presence_penalty", [0]), ("frequency_penalty", [0]), ("echo", [False]), ("suffix", []),
                          ("best_of", [])):  # fmt: skip
            if key in body["properties"]:  # accepted only at the neutral value: say so
                body["properties"][key] = {"anyOf": [{"enum": only}, {"type": "null"}] if only else [{"type": "null"}]}
        body["properties"]["logit_bias"] = {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]}
        body["properties"]["n"] = {
            "anyOf": [{"type": "integer", "minimum": 1, "maximum": card.max_n}, {"type": "null"}]
        }
        vocab = {"type": "integer", "minimum": 0, "maximum": card.vocab_size - 1}
        body["properties"]["stop_token_ids"]["anyOf"][0]["items"] = vocab
        if "prompt" in body["properties"]:  # text | [text] | [id] | [[id]]: a batch fits the slots, ids the vocabulary
            forms = body["properties"]["prompt"]["anyOf"]
            forms[1]["maxItems"] = forms[3]["maxItems"] = min(card.max_choices, card.max_prompts)
            forms[2]["items"] = forms[3]["items"]["items"] = vocab
        components[model.__name__] = body
    app.openapi_schema = schema
    return schema


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop taking generation requests (503, /health 503), wait for in-flight ones (at most
    ``drain_timeout``), then exit normally -- uvicorn's own handler would re-raise the signal after shutdown, and the
    process would die by it instead of exiting 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, engine: ServingEngine, drain_timeout: float):
        super().__init__(config)
        self.serving, self.engine, self.drain_timeout = state, engine, drain_timeout
        self._drain_since: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.serving.draining:
            self.should_exit = True
            return
        self.serving.draining = True
        self.engine.close()
        self._drain_since = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.serving.draining and not self.should_exit:
            assert self._drain_since is not None
            if self.serving.inflight == 0 or time.monotonic() - self._drain_since > self.drain_timeout:
                self.should_exit = True
        if self.engine.failure:
            self.should_exit = True
        return await super().on_tick(counter)
