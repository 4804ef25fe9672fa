"""Request bodies of the OpenAI-compatible API and their validation, all on rank 0 before anything is broadcast.

The pydantic models are the one source of truth for field names, types and ranges: they validate (strict: no
"5" for 5, no true for 1, no NaN) and they are the OpenAPI schema that ``/openapi.json`` publishes and the fuzz
tests drive. What a schema cannot say (the served model's name, prompt + max_tokens within the context, token ids
within the vocabulary, the server's slot count) is checked in :func:`resolve_completion` / :func:`resolve_chat`.
Every failure is an :class:`APIError`, answered in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from mrlhf.generation.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
INT64 = 2**63


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _clean_text(s: str) -> str:
    """NUL bytes and lone surrogates (``"\\ud800"`` is valid JSON, not valid text) never reach the tokenizer."""
    if "\x00" in s:
        raise ValueError("must not contain NUL characters")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid unicode (it holds a lone surrogate)") from None
    return s


def _integral(v: Any) -> Any:
    """JSON Schema's "integer" includes 2.0: an integral float becomes an int; 2.5, "2" and true stay wrong."""
    if isinstance(v, float) and v.is_integer() and abs(v) < INT64:
        return int(v)
    return v


Text = Annotated[str, AfterValidator(_clean_text), WithJsonSchema({"type": "string", "pattern": "^[^\\u0000]*$"})]
NonEmpty = Annotated[str, AfterValidator(_clean_text), WithJsonSchema(
    {"type": "string", "minLength": 1, "pattern": "^[^\\u0000]*$"}), Field(min_length=1)]  # fmt: skip


def _int(**bounds: int) -> Any:
    """An integer field type with ``bounds`` (ge/le/lt); the bounds sit before the validator so that the JSON schema
    shows them as minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TokenId = _int(ge=0, lt=INT64)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: Text
    max_tokens: _int(ge=1, lt=INT64) | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: _int(ge=-1, lt=INT64) | None = Field(None, description="vLLM extension: keep the k most likely (0/-1: off)")
    n: _int(ge=1, le=64) | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="extension: ids that end a choice")
    seed: _int(ge=-INT64, lt=INT64) | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="vLLM extension: generate max_tokens even past eos")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None


class CompletionBody(_Sampling):
    prompt: (
        NonEmpty
        | Annotated[list[NonEmpty], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    echo: bool | None = None
    suffix: Text | None = None
    best_of: _int(ge=1, le=64) | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _int(ge=1, lt=INT64) | None = None
    logprobs: bool | None = None
    top_logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None


@dataclass
class ModelCard:
    """What validation needs to know about the served model and the server's limits."""

    name: str
    context: int  # longest prompt + completion, in tokens
    vocab_size: int
    eos_id: int
    bos_id: int | None
    encode: Any  # str -> list[int]
    template: Any  # ChatTemplate
    max_choices: int  # most sequences one request may run at once (n x prompts)
    max_n: int  # most choices of one prompt (rows of one ring slot)
    max_prompts: int = 64  # most prompts in one completions batch (the wait queue must hold them all)
    max_tokens_cap: int | None = None  # server-wide cap on max_tokens
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default)


@dataclass
class JobSpec:
    """A validated request, in engine terms."""

    kind: Literal["completion", "chat"]
    prompts: list[list[int]]
    n: int
    max_tokens: list[int]  # per prompt
    sampling: SamplingParams
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    logprobs: int | None  # None: no logprobs; k: the chosen token's and k alternatives
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: valid UTF-8, no NaN/Infinity literals, not too deeply nested."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    if not text.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _param(loc: tuple) -> str:
    """'messages.0.content' from a pydantic location, without the union-member tags pydantic inserts."""
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and str(p) not in ("str", "int"))]
    return ".".join(parts) or "body"


def validate_body(model: type[_Strict], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if first["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param=param, code="missing") from None
        if len({_param(x["loc"]).split(".")[0] for x in errors}) == 1 and len(errors) > 1:
            message = f"{param}: invalid value ({'; '.join(sorted({x['msg'] for x in errors}))})"
        else:
            message = f"{param}: {first['msg']}"
        raise APIError(400, message, param=param, code="invalid_value") from None


def _unsupported(body: _Sampling) -> None:
    """Known OpenAI parameters that mrlhf accepts only at their neutral value."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name, code="unsupported_parameter")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _stops(body: _Sampling) -> tuple[str, ...]:
    stop = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} sequences", param="stop")
    if any(s == "" for s in stop):
        raise APIError(400, "stop: sequences must not be empty", param="stop")
    return tuple(stop)


def _sampling(body: _Sampling, card: ModelCard) -> tuple[SamplingParams, tuple[int, ...]]:
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    top_k = max(body.top_k or 0, 0)
    seed = secrets.randbits(63) if body.seed is None else body.seed
    ids = tuple(body.stop_token_ids or ())
    for i in ids:
        if i >= card.vocab_size:
            raise APIError(400, f"stop_token_ids: {i} is outside the vocabulary (size {card.vocab_size})",
                           param="stop_token_ids")  # fmt: skip
    stop_ids = ids if body.ignore_eos else (card.eos_id, *ids)
    return SamplingParams(temperature, top_k, top_p, seed), tuple(dict.fromkeys(stop_ids))


def _max_tokens(
    requested: int | None, default: int | None, prompt_len: int, card: ModelCard, param: str, prompt_param: str
) -> int:
    if requested is not None and card.max_tokens_cap is not None and requested > card.max_tokens_cap:
        raise APIError(400, f"{param} is {requested}; this server allows at most {card.max_tokens_cap}", param=param)
    room = card.context - prompt_len
    wanted = requested if requested is not None else (default if default is not None else room)
    if card.max_tokens_cap is not None:
        wanted = min(wanted, card.max_tokens_cap)
    if wanted > room or room < 1:
        raise APIError(
            400, f"This model's maximum context length is {card.context} tokens. However, you requested "
            f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} in the completion). Please reduce "
            "the prompt or the completion length.", param=prompt_param,
            code="context_length_exceeded",
        )  # fmt: skip
    return wanted


def _check_model(body: _Sampling, card: ModelCard) -> None:
    if body.model != card.name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{card.name}'",
                       param="model", code="model_not_found")  # fmt: skip


def _choices(n: int, prompts: int, card: ModelCard) -> None:
    if n > card.max_n:
        raise APIError(400, f"n is {n}; this server runs at most {card.max_n} choices of one prompt", param="n")
    if n * prompts > card.max_choices:
        raise APIError(400, f"{prompts} prompt(s) x n={n} needs {n * prompts} sequence slots; this server has "
                       f"{card.max_choices}", param="n")  # fmt: skip


def _encode(text: str, card: ModelCard) -> list[int]:
    return ([] if card.bos_id is None else [card.bos_id]) + list(card.encode(text))


def resolve_completion(body: dict[str, Any], card: ModelCard) -> JobSpec:
    """``POST /v1/completions`` body -> JobSpec; prompts are raw text (no chat template) or token ids."""
    req: CompletionBody = validate_body(CompletionBody, body)
    _check_model(req, card)
    _unsupported(req)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo", code="unsupported_parameter")
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    p = req.prompt
    batch: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not batch or any(len(x) == 0 for x in batch):
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(batch) > card.max_prompts:
        raise APIError(400, f"prompt: at most {card.max_prompts} prompts per request", param="prompt")
    n = req.n or 1
    if req.best_of is not None:
        raise APIError(400, "best_of is not supported", param="best_of", code="unsupported_parameter")
    _choices(n, len(batch), card)
    prompts = []
    for x in batch:
        ids = _encode(x, card) if isinstance(x, str) else list(x)
        if any(i >= card.vocab_size for i in ids):
            raise APIError(
                400, f"prompt: token ids must be below the vocabulary size {card.vocab_size}", param="prompt"
            )
        prompts.append(ids)
    sampling, stop_ids = _sampling(req, card)
    max_tokens = [
        _max_tokens(req.max_tokens, card.default_max_tokens, len(x), card, "max_tokens", "prompt") for x in prompts
    ]
    return JobSpec("completion", prompts, n, max_tokens, sampling, _stops(req), stop_ids, req.logprobs,
                   bool(req.stream), bool(req.stream_options and req.stream_options.include_usage))  # fmt: skip


def resolve_chat(body: dict[str, Any], card: ModelCard) -> JobSpec:
    """``POST /v1/chat/completions`` body -> JobSpec; the checkpoint's chat template renders the messages."""
    from mrlhf.data.records import Turn
    from mrlhf.errors import MrlhfError

    req: ChatBody = validate_body(ChatBody, body)
    _check_model(req, card)
    _unsupported(req)
    if req.messages[-1].role == "assistant":
        raise APIError(400, "the last message must not be 'assistant': the model writes that turn", param="messages")
    turns = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        turns.append(Turn("system" if m.role == "developer" else m.role, content))
    try:
        prompt = _encode(card.template.render_prompt(turns), card)
    except MrlhfError as e:
        raise APIError(400, str(e), param="messages") from None
    n = req.n or 1
    _choices(n, 1, card)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "pass max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    requested, name = (req.max_completion_tokens, "max_completion_tokens") if req.max_tokens is None else (
        req.max_tokens, "max_tokens")  # fmt: skip
    max_tokens = _max_tokens(requested, None, len(prompt), card, name, "messages")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    sampling, stop_ids = _sampling(req, card)
    return JobSpec("chat", [prompt], n, [max_tokens], sampling, _stops(req), stop_ids, logprobs, bool(req.stream),
                   bool(req.stream_options and req.stream_options.include_usage))  # fmt: skip
