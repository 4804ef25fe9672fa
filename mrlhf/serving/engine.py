"""Continuous batching over the pipeline ring, run in lockstep by every rank of one model replica.

The KV cache has ``slots`` ring slots of ``rows`` rows; a row holds one sequence (one choice of one request). Every
tick, global rank 0 broadcasts one command (requests to admit into named free rows of the slot stage 0 works on
next, sequences to cancel, or shutdown) and every rank applies it to its copy of the row table, so all ranks agree
on what each stage computes without any other message. Stage ``p`` runs, at tick ``t``, the work stage 0 started
at tick ``t - p`` (a systolic ring: with ``slots >= pp`` every stage is busy on a different slot); the last stage
broadcasts the chosen tokens over its pipeline group, every rank applies them, and a sequence that ends (a stop
token, max_tokens) frees its row at once -- the next visit of stage 0 to that slot can fill it. Stop strings,
client disconnects and deadlines are decided on rank 0 (it holds the text) and reach the others as cancels.

Only rank 0 talks to clients: :meth:`ServingEngine.submit` / :meth:`cancel` are called from the HTTP thread, the
tick loop runs in its own thread there and in the main thread elsewhere. A broadcast is only ever made with input
that rank 0 validated (``protocol.py``); the command is JSON, never pickled.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mrlhf.generation.sampling import SamplingParams
from mrlhf.parallel import comm
from mrlhf.serving.stage import Prefill, StageRunner, Work


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one choice, or its end. ``finish``: None, 'stop' (a stop token; it is ``token``), 'length'
    (max_tokens reached with ``token``), 'abort' (the engine stopped; ``token`` is -1)."""

    rid: int
    choice: int
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    finish: str | None


@dataclass
class EngineRequest:
    """A validated prompt to run ``n`` times."""

    prompt: list[int]
    n: int
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: tuple[int, ...]
    top: int = 0  # alternatives with each token's log-prob
    emit: Callable[[TokenEvent], None] | None = None  # rank 0: called from the engine thread


class EngineBusy(Exception):
    """The wait queue is full (answered 429) or the engine no longer takes work (503)."""

    def __init__(self, message: str, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed


@dataclass
class _Lane:
    rid: int
    choice: int
    start: int  # left padding of the prompt in this row (prompts admitted together are padded to one width)
    kv_len: int  # columns in the cache
    max_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    top: int
    emit: Callable[[TokenEvent], None] | None
    produced: int = 0
    next_token: int = -1  # the last chosen token, fed at the next decode of this row


class ServingEngine:
    """The row table, the command protocol and the tick loop. Made before the model loads (rank 0 answers /health
    meanwhile and queues nothing); :meth:`run` gets the stage's :class:`StageRunner` once it exists."""

    def __init__(self, slots: int, rows: int, pp: int, pp_rank: int, leader: bool, context: int, max_queue: int = 64,
                 max_prefill_tokens: int = 4096, heartbeat_s: float = 5.0) -> None:  # fmt: skip
        if slots < pp:
            raise ValueError(f"serving needs slots >= pp (every stage works on its own slot), got {slots} < {pp}")
        self.runner: StageRunner | None = None
        self.slots, self.rows, self.pp, self.pp_rank, self.context = slots, rows, pp, pp_rank, context
        self.leader, self.max_queue, self.heartbeat_s = leader, max_queue, heartbeat_s
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens prefilled per tick (at least one prompt)
        self.lanes: list[list[_Lane | None]] = [[None] * rows for _ in range(slots)]
        self.history: deque[Work | None] = deque(maxlen=pp)  # history[i]: the work stage 0 started i ticks ago
        self.tick = 0
        self.generated = 0  # tokens produced (every choice, cancelled ones included)
        self._inbox: torch.Tensor | None = None
        self._cv = threading.Condition()
        self._waiting: deque[tuple[int, EngineRequest]] = deque()
        self._cancels: list[list[int]] = []
        self._emitters: dict[int, Callable[[TokenEvent], None] | None] = {}  # admitted, not yet planned
        self._next_rid = 0
        self._shutdown = self._closed = False
        self.running = False  # the loop is ticking
        self.failure: str | None = None

    # -- rank 0: the HTTP side ---------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.slots * self.rows

    @property
    def busy_rows(self) -> int:
        return sum(lane is not None for slot in self.lanes for lane in slot)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, requests: list[EngineRequest]) -> list[int]:
        """Queue all of ``requests`` or none (EngineBusy); returns their ids."""
        if any(not 1 <= req.n <= self.rows for req in requests):  # protocol.py keeps n <= rows; never wait forever
            raise ValueError(f"a request needs 1 <= n <= {self.rows} (the rows of one ring slot)")
        with self._cv:
            if self._closed or self.failure:
                raise EngineBusy("the server is shutting down", closed=True)
            if len(self._waiting) + len(requests) > self.max_queue:
                raise EngineBusy(f"the wait queue is full ({self.max_queue} requests)")
            rids = []
            for req in requests:
                rids.append(self._next_rid)
                self._waiting.append((self._next_rid, req))
                self._next_rid += 1
            self._cv.notify()
        return rids

    def cancel(self, rid: int, choice: int | None = None) -> None:
        """Stop ``rid`` (one choice, or all): dropped from the queue, or its rows freed at the next tick."""
        with self._cv:
            for item in self._waiting:
                if item[0] == rid:
                    self._waiting.remove(item)
                    return
            self._cancels.append([rid, -1 if choice is None else choice])
            self._cv.notify()

    def shutdown(self) -> None:
        """Rank 0: stop every rank's loop at the next tick (after the HTTP side drained)."""
        with self._cv:
            self._shutdown = self._closed = True
            self._cv.notify()

    def close(self) -> None:
        """Take no new requests (draining)."""
        with self._cv:
            self._closed = True

    # -- every rank: the loop -----------------------------------------------------------------------------------------

    def run(self, runner: StageRunner) -> None:
        """The tick loop until rank 0 sends shutdown (rank 0: in the engine thread; others: the main thread)."""
        self.runner = runner
        self.running = True
        try:
            while True:
                cmd = self._exchange(self._next_command() if self.leader else None)
                if cmd.get("shutdown"):
                    break
                self._tick(cmd)
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.running = False
            if self.leader:
                self._abort_all()

    def _idle(self) -> bool:
        return not (self._waiting or self._cancels or self._shutdown or self.busy_rows or any(self.history))

    def _next_command(self) -> dict:
        with self._cv:
            if self._idle():  # nothing to do: wait for work, but tick now and then so no collective times out
                self._cv.wait_for(lambda: not self._idle(), timeout=self.heartbeat_s)
            if self._shutdown:
                return {"shutdown": True}
            cancels, self._cancels = self._cancels, []
            slot = self.tick % self.slots
            free = [r for r, lane in enumerate(self.lanes[slot]) if lane is None or _cancelled(lane, cancels)]
            admits, width, longest = [], 0, 0
            while self._waiting and len(free) >= self._waiting[0][1].n:
                rid, req = self._waiting[0]
                # one left-padded prefill batch: every member must fit the cache at the batch's width, and the
                # batch stays under max_prefill_tokens (one prompt always goes)
                w, m = max(width, len(req.prompt)), max(longest, req.max_tokens)
                if admits and (w + m > self.context or w * (len(admits) + 1) > self.max_prefill_tokens):
                    break
                self._waiting.popleft()
                rows, free = free[: req.n], free[req.n :]
                width, longest = w, m
                s = req.sampling
                admits.append({"rid": rid, "rows": rows, "prompt": req.prompt, "max_tokens": req.max_tokens,
                               "t": s.temperature, "k": s.top_k, "p": s.top_p, "seed": s.seed,
                               "stop": list(req.stop_token_ids), "top": req.top})  # fmt: skip
                self._emitters[rid] = req.emit
        return {k: v for k, v in (("cancel", cancels), ("admit", admits)) if v}

    def _exchange(self, cmd: dict | None) -> dict:
        """Rank 0's command to every rank: a length, then (when there is one) the JSON bytes."""
        device = self.runner.device
        raw = json.dumps(cmd, separators=(",", ":")).encode() if self.leader and cmd else b""
        header = torch.tensor([len(raw)], dtype=torch.long, device=device)
        comm.broadcast_from_rank0(header)
        n = int(header[0])
        if n == 0:
            return {}
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device) if self.leader else torch.empty(
            n, dtype=torch.uint8, device=device)  # fmt: skip
        comm.broadcast_from_rank0(buf)
        return cmd if self.leader else json.loads(bytes(buf.cpu().numpy()))

    def _tick(self, cmd: dict) -> None:
        for rid, choice in cmd.get("cancel", ()):
            self._free_matching(rid, choice)
        self.history.appendleft(self._plan(self.tick % self.slots, cmd.get("admit", ())))
        mine = self.history[self.pp_rank] if len(self.history) > self.pp_rank else None
        out = self.runner.run(mine, self._inbox) if mine is not None else None
        self._inbox = None
        if self.pp > 1:  # each stage passes its output on and takes the previous stage's, in one batch
            send = out if mine is not None and not self.runner.last else None
            prev = self.history[self.pp_rank - 1] if 0 < self.pp_rank <= len(self.history) else None
            spec = None if prev is None else (torch.Size((prev.hidden_rows, self.runner.hidden)), self.runner.dtype,
                                              self.runner.device)  # fmt: skip
            self._inbox = comm.send_forward_recv_forward(send, spec)
        done = self.history[self.pp - 1] if len(self.history) == self.pp else None
        if done is not None:
            shape = (len(done.lanes), 2 + 2 * done.top)
            res = out if self.runner.last else torch.empty(shape, dtype=torch.float64, device=self.runner.device)
            comm.broadcast_from_last_stage(res)
            self._apply(done, res.cpu().tolist())
        self.tick += 1

    def _plan(self, slot: int, admits) -> Work | None:
        """The work stage 0 starts now in ``slot``: decode its busy rows, prefill the admitted prompts."""
        lanes = self.lanes[slot]
        decoded = [r for r, lane in enumerate(lanes) if lane is not None]
        rows = decoded[-1] + 1 if decoded else 0
        cols, starts, tokens = [0] * rows, [0] * rows, [self.runner.pad_id] * rows
        for r in decoded:
            lane = lanes[r]
            assert lane.produced > 0, "a row was decoded before its first token came back (slots < pp?)"
            cols[r], starts[r], tokens[r] = lane.kv_len, lane.start, lane.next_token
            lane.kv_len += 1
        prefill = Prefill([a["prompt"] for a in admits], [a["rows"] for a in admits]) if admits else None
        for a in admits:
            sampling = SamplingParams(a["t"], a["k"], a["p"], a["seed"])
            emit = self._emitters.pop(a["rid"], None) if self.leader else None
            for j, r in enumerate(a["rows"]):
                if lanes[r] is not None:
                    raise RuntimeError(f"serving desync: row {r} of slot {slot} is busy at tick {self.tick}")
                lanes[r] = _Lane(a["rid"], j, prefill.width - len(a["prompt"]), prefill.width, a["max_tokens"],
                                 sampling, frozenset(a["stop"]), a["top"], emit)  # fmt: skip
        if not decoded and prefill is None:
            return None
        result_rows = decoded + [r for a in admits for r in a["rows"]]
        owners = [(slot, r, lanes[r]) for r in result_rows]
        sampling = [(lane.sampling, lane.produced, lane.choice) for _, _, lane in owners]
        top = max(lane.top for _, _, lane in owners)
        return Work(slot, rows, cols, starts, tokens, decoded, prefill, owners, top, sampling)

    def _apply(self, work: Work, res: list[list[float]]) -> None:
        """Every rank: the chosen tokens of ``work``; rows whose sequence ended are freed now."""
        k = work.top
        for (slot, r, lane), row in zip(work.lanes, res):
            if self.lanes[slot][r] is not lane:  # cancelled while its token was in flight
                continue
            token = int(row[0])
            lane.produced += 1
            lane.next_token = token
            self.generated += 1
            finish = "stop" if token in lane.stop_ids else "length" if lane.produced >= lane.max_tokens else None
            if finish:
                self.lanes[slot][r] = None
            if lane.emit is not None:
                top = tuple((int(row[2 + i]), row[2 + k + i]) for i in range(lane.top))
                lane.emit(TokenEvent(lane.rid, lane.choice, token, row[1], top, finish))

    def _free_matching(self, rid: int, choice: int) -> None:
        for slot in self.lanes:
            for r, lane in enumerate(slot):
                if lane is not None and lane.rid == rid and choice in (-1, lane.choice):
                    slot[r] = None

    def _abort_all(self) -> None:
        """Rank 0, the loop has ended: every request still waiting or running gets an 'abort'."""
        with self._cv:
            self._closed = True
            pending = [(rid, range(req.n), req.emit) for rid, req in self._waiting]
            self._waiting.clear()
        for slot in self.lanes:
            for r, lane in enumerate(slot):
                if lane is not None:
                    pending.append((lane.rid, (lane.choice,), lane.emit))
                    slot[r] = None
        for rid, choices, emit in pending:
            for choice in choices:
                if emit is not None:
                    emit(TokenEvent(rid, choice, -1, 0.0, (), "abort"))


def _cancelled(lane: _Lane, cancels: list[list[int]]) -> bool:
    return any(lane.rid == rid and choice in (-1, lane.choice) for rid, choice in cancels)
