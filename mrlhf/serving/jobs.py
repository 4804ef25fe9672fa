"""One HTTP request's generation on rank 0: engine events -> per-choice text, logprobs and finish reasons -> OpenAI's
response and stream-chunk shapes. Streaming and non-streaming answers come from the same per-event updates.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mrlhf.serving.engine import EngineRequest, ServingEngine, TokenEvent
from mrlhf.serving.protocol import APIError, JobSpec
from mrlhf.serving.text import Detokenizer, StopText, utf8_bytes


class Deadline(Exception):
    """The request ran past the server's per-request timeout."""


class Aborted(Exception):
    """The engine stopped before the request finished."""


def _lp(x: float) -> float:
    """OpenAI's stand-in for an impossible token's log-prob (JSON has no -inf)."""
    return x if math.isfinite(x) else -9999.0


@dataclass
class Entry:
    """The logprob record of one generated token: its text, log-prob and alternatives (text, log-prob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Update:
    """What one engine event changed in one choice."""

    index: int
    text: str = ""
    entries: list[Entry] = field(default_factory=list)
    finish: str | None = None


class Choice:
    """One choice's state: its detokenizer, stop strings and everything it has produced."""

    def __init__(self, index: int, decode, stops: tuple[str, ...], logprobs: int | None) -> None:
        self.index, self.logprobs = index, logprobs
        self.detok, self.stop = Detokenizer(decode), StopText(stops)
        self.text: list[str] = []
        self.entries: list[Entry] = []
        self.finish: str | None = None
        self.tokens = 0  # generated tokens, a stop token included (usage)

    def on_event(self, ev: TokenEvent) -> tuple[Update, bool]:
        """Apply ``ev``; returns the update and whether the engine must cancel this choice (a stop string)."""
        upd = Update(self.index)
        if self.finish is not None:
            return upd, False
        if ev.finish == "abort":
            raise Aborted()
        self.tokens += 1
        out = ""
        if ev.finish != "stop":  # a stop token ends the choice and is not part of its text
            if self.logprobs is not None:
                alts = [(self.detok.piece(t), _lp(lp)) for t, lp in ev.top]
                upd.entries.append(Entry(self.detok.piece(ev.token), _lp(ev.logprob), alts))
            out = self.stop.feed(self.detok.add(ev.token))
        if self.stop.stopped:
            upd.finish = "stop"
        elif ev.finish is not None:
            out += self.stop.feed(self.detok.flush())
            out += self.stop.flush()
            upd.finish = "stop" if ev.finish == "stop" or self.stop.stopped else "length"
        upd.text = out
        self.text.append(out)
        self.entries.extend(upd.entries)
        self.finish = upd.finish
        return upd, upd.finish is not None and ev.finish is None


class Run:
    """The engine requests of one HTTP request (one per prompt, n choices each) and the queue of their events."""

    def __init__(self, spec: JobSpec, engine: ServingEngine, decode, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.engine, self.loop = spec, engine, loop
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.choices = [Choice(i, decode, spec.stop, spec.logprobs) for i in range(len(spec.prompts) * spec.n)]
        self.rids: list[int] = []
        self.created = int(time.time())
        self.id = ("chatcmpl-" if spec.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.first_token_at: float | None = None

    def submit(self) -> None:
        """Queue every prompt or none (EngineBusy propagates)."""
        s = self.spec
        reqs = [EngineRequest(p, s.n, m, s.sampling, s.stop_token_ids, s.logprobs or 0, self._emit)
                for p, m in zip(s.prompts, s.max_tokens)]  # fmt: skip
        self.rids = self.engine.submit(reqs)
        self._slot = {rid: i for i, rid in enumerate(self.rids)}

    def _emit(self, ev: TokenEvent) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop has closed (server shut down)
            pass

    @property
    def finished(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    def cancel_unfinished(self) -> None:
        for rid in self.rids:
            i = self._slot[rid]
            if any(c.finish is None for c in self.choices[i * self.spec.n : (i + 1) * self.spec.n]):
                self.engine.cancel(rid)

    async def updates(self, deadline: float) -> AsyncIterator[Update]:
        """Each choice update as its event arrives, until every choice has finished; Deadline / Aborted."""
        while not self.finished:
            if not self.queue.empty():  # no timer task per event when the engine is ahead of us
                ev = self.queue.get_nowait()
            else:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=max(deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    raise Deadline() from None
            if time.monotonic() > deadline:
                raise Deadline()
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            choice = self.choices[self._slot[ev.rid] * self.spec.n + ev.choice]
            upd, cancel = choice.on_event(ev)
            if cancel:
                self.engine.cancel(ev.rid, ev.choice)
            yield upd

    # -- OpenAI shapes -----------------------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.spec.prompts)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, entries: list[Entry], offset: int) -> dict[str, Any] | None:
        if self.spec.logprobs is None:
            return None
        if self.spec.kind == "chat":
            return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": utf8_bytes(e.token),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": utf8_bytes(t)} for t, lp in e.top]}
                                for e in entries], "refusal": None}  # fmt: skip
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.token)
        top = [dict(reversed(e.top)) for e in entries] if self.spec.logprobs else None  # best wins a text clash
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets}  # fmt: skip

    def response(self, model: str) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            item: dict[str, Any] = {
                "index": c.index,
                "logprobs": self._logprobs(c.entries, 0),
                "finish_reason": c.finish,
            }
            if self.spec.kind == "chat":
                item["message"] = {"role": "assistant", "content": text}
            else:
                item["text"] = text
            choices.append(item)
        kind = "chat.completion" if self.spec.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": None}  # fmt: skip

    def chunk(self, model: str, upd: Update | None, role: bool = False, usage: bool = False) -> dict[str, Any]:
        """A stream chunk: one choice's update, the chat role opener of choice ``upd.index``, or the usage chunk."""
        kind = "chat.completion.chunk" if self.spec.kind == "chat" else "text_completion"
        body: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": model,
                                "system_fingerprint": None}  # fmt: skip
        if usage:
            body["choices"], body["usage"] = [], self.usage()
            return body
        assert upd is not None
        choice = self.choices[upd.index]
        offset = sum(len(e.token) for e in choice.entries[: len(choice.entries) - len(upd.entries)])
        item: dict[str, Any] = {"index": upd.index, "logprobs": self._logprobs(upd.entries, offset),
                                "finish_reason": upd.finish}  # fmt: skip
        if self.spec.kind == "chat":
            item["delta"] = (
                {"role": "assistant", "content": ""} if role else ({"content": upd.text} if upd.text else {})
            )
            if role:
                item["logprobs"] = None
        else:
            item["text"] = upd.text
        body["choices"] = [item]
        if self.spec.include_usage:
            body["usage"] = None
        return body


def busy_error(message: str, closed: bool) -> APIError:
    if closed:
        return APIError(503, message, "service_unavailable", code="draining")
    return APIError(429, message, "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
