"""Generation inside the training layout: prefill + incremental decode over the KV cache, TP and PP.

Pipeline schedule: the stages form a ring. ``S >= pp`` microbatches ("slots") are in flight; at every tick each
stage works on a different slot -- the first stage embeds (a new prompt batch for a free slot, or the tokens just
sampled for a busy one), middle stages pass hidden states on, the last stage samples and sends the new tokens back
to the first stage. A slot whose sequences are all finished is refilled with waiting prompts. With S >= pp every
stage is busy at every tick once the ring is full, instead of 1/pp of the time when one batch walks the pipeline.

Every message between stages is a fixed 8-int header followed by its payload, so stages need no shared view of
which sequences finished: the header says what the payload is. TP ranks of a stage do identical work; sampling
is vocab-parallel (``sampling.py``), so all TP ranks pick the same token without gathering the logits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps

from mrlhf.config import GenerationSection
from mrlhf.data.collate import collate_prompts
from mrlhf.errors import ConfigError
from mrlhf.generation.fast_decode import decode_layers, decode_plan, embed, supports
from mrlhf.generation.sampling import SamplingParams, sample_tokens
from mrlhf.models.backbone import backbone_forward
from mrlhf.models.heads import vocab_parallel_logits
from mrlhf.ops.kv_cache import DecodeState, KVCache, decoding
from mrlhf.ops.kv_ops import has_decode_linear
from mrlhf.parallel import comm

IDLE, PREFILL, DECODE, STOP = 0, 1, 2, 3
REASONS = ("length", "eos", "stop_string")


@dataclass
class GenerationConfig:
    """What to generate and how."""

    max_new_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    micro_batch_size: int = 8
    num_slots: int | None = None  # None: pp (the minimum that keeps every stage busy)

    @classmethod
    def from_section(cls, section: GenerationSection, eos_id: int) -> GenerationConfig:
        """The engine's settings from a run's ``generation`` config section; ``eos_id`` ends a sequence."""
        return cls(
            max_new_tokens=section.max_new_tokens,
            sampling=SamplingParams(section.temperature, section.top_k, section.top_p, section.seed),
            stop_token_ids=(eos_id,),
            stop_strings=tuple(section.stop_strings),
            micro_batch_size=section.micro_batch_size,
            num_slots=section.num_slots,
        )


def cache_extent(gen, pp: int, prompts: int, width: int) -> tuple[int, int, int]:
    """(slots, rows, positions) of the KV cache ``Generator.generate`` allocates for ``prompts`` prompts left-padded
    to ``width`` (``gen``: a GenerationConfig or the run's ``generation`` section): ``num_slots`` (default pp, the
    fewest that keep every stage busy; fewer is the naive schedule, for benchmarks), the largest microbatch, the
    prompt width plus ``max_new_tokens``. ``mrlhf plan`` sizes its KV cache with it too."""
    return gen.num_slots or pp, min(gen.micro_batch_size, max(prompts, 1)), width + gen.max_new_tokens


@dataclass
class GenerationOutput:
    """Per prompt, in input order: generated ids (stop token included), their log-probs, why it ended."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Slot:
    mb: int
    seq_ids: torch.Tensor  # [B] global prompt indices
    width: int  # left-padded prompt width P
    starts: torch.Tensor  # [B] number of left pads
    produced: int = 0  # generated tokens so far


class Generator:
    """Runs generation for one role model (actor) on this rank's stage."""

    def __init__(
        self,
        model,
        gen: GenerationConfig,
        pad_id: int,
        decode_text: Callable[[list[int]], str] | None = None,
        fast_decode: bool = True,
        fused_linear: bool = True,
    ) -> None:
        self.model, self.gen, self.pad_id, self.decode_text = model, gen, pad_id, decode_text
        self.gpt = model.backbone
        cfg = self.gpt.config
        self.hidden = cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.pp, self.pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.first, self.last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        self.groups = cfg.num_query_groups // ps.get_tensor_model_parallel_world_size()
        self.head_dim = cfg.kv_channels
        self.layer_offset = self.gpt.decoder.layers[0].layer_number - 1
        self.rope = getattr(self.gpt, "rotary_pos_emb", None)
        self.fast = fast_decode and supports(self.gpt)
        # decode-step matmuls (layers and LM head) through mrlhf::decode_linear where it has a kernel (CPU)
        self.fused = self.fast and fused_linear and has_decode_linear(self.device)
        self.plan = decode_plan(self.gpt) if self.fast else None
        if gen.stop_strings and decode_text is None:
            raise ValueError("stop strings need decode_text (a tokenizer's decode)")

    # -- one forward of one slot on this stage ---------------------------------------------------------------------

    def _forward(self, cache: KVCache, slot_idx: int, slot: _Slot, batch: dict, inp: torch.Tensor | None, tokens):
        b = slot.seq_ids.numel()
        if tokens is None:  # decode: one new token per sequence
            n = slot.produced
            col = slot.width + n - 1
            host_pos = col - slot.starts  # [B] logical positions (slot.starts lives on the host)
            pos = host_pos.to(self.device)
            state = DecodeState(
                cache=cache, slot=slot_idx, batch=b, layer_offset=self.layer_offset, prefill=False,
                write_pos=torch.full((b,), col, dtype=torch.long, device=self.device),
                starts=slot.starts.to(self.device),
                lengths=torch.full((b,), col + 1, dtype=torch.long, device=self.device),
            )  # fmt: skip
            if self.rope is not None:
                emb = self.rope(int(host_pos.max()) + 1)[pos][:, 0, 0]  # [B, D]; no device sync for the max
                state.cos, state.sin = torch.cos(emb).to(self.dtype), torch.sin(emb).to(self.dtype)
            toks = batch["next"].view(b, 1) if self.first else batch["dummy"]
            positions, mask = pos.view(b, 1), None
        else:
            state = DecodeState(
                cache=cache,
                slot=slot_idx,
                batch=b,
                layer_offset=self.layer_offset,
                prefill=True,
                write_pos=torch.zeros(b, dtype=torch.long, device=self.device),
            )
            toks, positions, mask = tokens["tokens"], tokens["position_ids"], tokens["attention_mask"]
        if tokens is None and self.fast:
            with torch.no_grad():
                hidden = embed(self.gpt, self.plan, toks, positions) if self.first else inp
                return decode_layers(self.gpt, hidden, state, self.fused, self.plan)
        with decoding(state), torch.no_grad():
            rope_in_op = tokens is None and self.rope is not None
            hidden = backbone_forward(self.gpt, toks, positions, mask, input_tensor=inp, rope=not rope_in_op)
        return hidden

    # -- the ring: asynchronous sends, blocking receives, FIFO per link -------------------------------------------
    #
    # Every message is one frame: the 8-int64 header, then a payload region of a fixed size per link (a full decode
    # microbatch: hidden states [1, rows, h] towards later stages, [2, rows] tokens/done flags back to the first).
    # One frame per tick halves the messages of a header-then-payload protocol; only a prefill's hidden states,
    # which do not fit, follow their frame as a second message.

    HEADER_BYTES = 64

    def _frame_bytes(self, to_first: bool) -> int:
        """Payload region of frames sent towards the first stage (tokens) or towards a later stage (hidden)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self._rows * 8 if to_first else self._rows * self.hidden * elem

    def _send(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        """Post (header, payload) to the next stage; wait for this stage's previous sends first (buffer lifetime)."""
        if self.pp == 1:
            self._loop.append((header, payload))
            return
        start = time.perf_counter()
        for work in self._pending_sends:
            work.wait()
        self._comm_s += time.perf_counter() - start
        room = self._frame_bytes(to_first=self.last)
        frame = torch.zeros(self.HEADER_BYTES + room, dtype=torch.uint8, device=self.device)
        frame[: self.HEADER_BYTES] = header.to(self.device).view(torch.uint8)
        raw = None if payload is None else payload.contiguous().view(-1).view(torch.uint8)
        inline = raw is not None and raw.numel() <= room
        if inline:
            frame[self.HEADER_BYTES : self.HEADER_BYTES + raw.numel()] = raw
        self._pending_sends = [comm.isend_next_stage(frame)]
        if raw is not None and not inline:
            self._pending_sends.append(comm.isend_next_stage(payload.contiguous()))

    def _on_return(self, rheader: torch.Tensor, rpayload, slots, pending) -> bool:
        """First stage: apply a frame that came back from the last stage (a slot's new tokens and done flags); True on
        STOP."""
        rh = rheader.tolist()  # one conversion instead of an indexing op per field
        rkind = rh[0]
        if rkind == STOP:
            return True
        if rkind in (PREFILL, DECODE):
            rs = rh[1]
            if bool(rpayload[1].bool().all()):
                slots[rs] = None
                pending.pop(rs, None)
            else:
                slots[rs].produced = rh[3] + 1
                pending[rs] = rpayload[0]
        return False

    def _post_return(self) -> None:
        """First stage, PP > 1: post the receive of one frame coming back from the last stage (always a single
        frame: header + [2, rows] tokens/done flags)."""
        frame = torch.empty(self.HEADER_BYTES + self._frame_bytes(to_first=True), dtype=torch.uint8, device=self.device)
        work = comm.irecv_prev_stage(frame)
        self._returns.append((work, frame))

    def _take_returns(self, slots, pending, need: int | None, until_stop: bool = False) -> bool:
        """First stage, PP > 1: apply returned frames in order -- those already complete, then (blocking) until slot
        ``need`` is no longer in flight, or until STOP comes back with ``until_stop``. True once STOP is seen."""
        while self._returns:
            work, frame = self._returns[0]
            in_flight = need is not None and slots[need] is not None and need not in pending
            if not (until_stop or in_flight) and not work.is_completed():
                return False
            start = time.perf_counter()
            work.wait()
            self._comm_s += time.perf_counter() - start
            self._returns.popleft()
            header, _, payload = self._parse_frame(frame)  # frames towards the first stage always hold theirs
            if self._on_return(header, payload, slots, pending):
                return True
        return False

    def _recv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The previous stage's next message (blocks until it arrives; the wait is counted in ``_comm_s``)."""
        if self.pp == 1:
            return self._loop.pop(0)
        start = time.perf_counter()
        try:
            return self._recv_message()
        finally:
            self._comm_s += time.perf_counter() - start

    def _recv_message(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        room = self._frame_bytes(to_first=self.first)
        frame = torch.empty(self.HEADER_BYTES + room, dtype=torch.uint8, device=self.device)
        comm.irecv_prev_stage(frame).wait()
        header, spec, payload = self._parse_frame(frame)
        if spec is None or payload is not None:
            return header, payload
        buf = torch.empty(spec[0], dtype=spec[1], device=self.device)  # did not fit: it follows as a second message
        comm.irecv_prev_stage(buf).wait()
        return header, buf

    def _parse_frame(self, frame: torch.Tensor):
        """(header on the host, payload (shape, dtype) or None, the payload as a view of the frame when it fits in
        the frame's region, else None). Each frame has its own buffer: the payload may outlive the next receive."""
        header = frame[: self.HEADER_BYTES].view(torch.long).cpu()
        spec = self._payload_spec(header)
        if spec is None:
            return header, None, None
        shape, dtype = spec
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes > frame.numel() - self.HEADER_BYTES:
            return header, spec, None
        return header, spec, frame[self.HEADER_BYTES : self.HEADER_BYTES + nbytes].view(dtype).view(shape)

    def _payload_spec(self, header: torch.Tensor):
        kind, _, mb, _, b, t = header[:6].tolist()
        if kind not in (PREFILL, DECODE):
            return None
        if self.first:  # from the last stage: sampled tokens and done flags
            return torch.Size((2, b)), torch.long
        return torch.Size((t, b, self.hidden)), self.dtype

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seq_id_offset: int = 0) -> GenerationOutput:
        """Generate for every prompt (all ranks of a DP replica pass the same list); every rank returns the same output.

        The sampling noise of prompt ``i`` is keyed by sequence id ``seq_id_offset + i``: DP ranks that generate
        different shares of one global batch pass their share's offset, so each sample is the one a single rank
        generating the whole batch would draw."""
        g = self.gen
        longest, limit = max(map(len, prompts), default=0), self.gpt.max_sequence_length
        if longest + g.max_new_tokens > limit:
            # past it learned positions do not exist and RoPE models run where they were never trained (a Mistral
            # checkpoint's limit is its sliding window, beyond which full attention differs): refuse, do not guess
            raise ConfigError(
                f"a prompt of {longest} tokens + generation.max_new_tokens ({g.max_new_tokens}) exceeds "
                f"model.max_position_embeddings ({limit}): shorten the prompts (data.max_prompt_len) or max_new_tokens"
            )
        self._seq_offset = seq_id_offset
        mb_size = g.micro_batch_size
        mbs = []
        for start in range(0, len(prompts), mb_size):
            batch = collate_prompts(prompts[start : start + mb_size], self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["seq_ids"] = torch.arange(start, start + batch["tokens"].shape[0])
            batch["starts"] = (~batch["attention_mask"]).sum(-1).cpu()
            batch["dummy"] = torch.zeros((batch["tokens"].shape[0], 1), dtype=torch.long, device=self.device)
            mbs.append(batch)
        width = max((m["tokens"].shape[1] for m in mbs), default=1)
        # the largest microbatch (self._rows) sizes the cache and the ring frames
        num_slots, self._rows, positions = cache_extent(g, self.pp, len(prompts), width)
        cache = KVCache(
            len(self.gpt.decoder.layers), num_slots, self._rows, positions,
            self.groups, self.head_dim, self.dtype, self.device,
        )  # fmt: skip
        n, cap = len(prompts), g.max_new_tokens
        out_tokens = torch.full((n, cap), -1, dtype=torch.long)
        out_logprobs = torch.zeros((n, cap), dtype=torch.float32)
        out_len = torch.full((n,), cap, dtype=torch.long)
        out_reason = torch.zeros((n,), dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)

        slots: list[_Slot | None] = [None] * num_slots
        pending: dict[int, torch.Tensor] = {}  # first stage: slot -> next input tokens
        waiting = deque(range(len(mbs)))
        self._loop, self._pending_sends = [], []
        tick, stop_sent, busy_time, self._comm_s = 0, False, 0.0, 0.0
        self._returns = deque()  # first stage, PP > 1: posted receives of the frames coming back, oldest first
        ahead = self.first and self.pp > 1
        t0 = time.perf_counter()
        while True:
            # 1. what this stage works on now: the first stage decides, the others take the next message
            inp = None
            if self.first:
                if ahead and not stop_sent:  # returned tokens: take what has arrived; wait only for this slot's
                    self._take_returns(slots, pending, need=tick % num_slots)
                header = None if stop_sent else self._decide(tick % num_slots, slots, pending, waiting, mbs)
            else:
                header, inp = self._recv()
            fields = None if header is None else header.tolist()
            kind = IDLE if fields is None else fields[0]
            # 2. compute
            out_payload = None
            if kind in (PREFILL, DECODE):
                start = time.perf_counter()
                s, m = fields[1], fields[2]
                if kind == PREFILL and not self.first:
                    slots[s] = _Slot(m, mbs[m]["seq_ids"], mbs[m]["tokens"].shape[1], mbs[m]["starts"])
                sl = slots[s]
                sl.produced = fields[3]
                batch = dict(mbs[m])
                if kind == DECODE and self.first:
                    batch["next"] = pending.pop(s)
                hidden = self._forward(cache, s, sl, batch, inp, mbs[m] if kind == PREFILL else None)
                if self.last:
                    out_payload = self._sample(hidden, sl, out_tokens, out_logprobs, out_len, out_reason, done)
                    if not self.first and bool(done[sl.seq_ids].all()):
                        slots[s] = None
                else:
                    out_payload = hidden
                busy_time += time.perf_counter() - start
            # 3. pass it on; a non-first stage stops right after forwarding STOP
            if header is not None:
                self._send(header, out_payload)
                if ahead:  # every frame comes back around the ring: post its receive now
                    self._post_return()
            if not self.first:
                if kind == STOP:
                    break
                continue
            stop_sent |= kind == STOP
            # 4. first stage: take back the new tokens of a slot. PP = 1: one message per tick from the local loop.
            # PP > 1: receives are posted ahead (step 3) and taken as they complete (step 1), so with S > PP slots the
            # round trip of one slot overlaps the compute of the next; after STOP, drain the ring.
            if ahead:
                if stop_sent and self._take_returns(slots, pending, need=None, until_stop=True):
                    break
            else:
                if self._on_return(*self._recv(), slots, pending):
                    break
            tick += 1
        for work in self._pending_sends:
            work.wait()
        wall = time.perf_counter() - t0
        kv_bytes = cache.nbytes
        cache.free()
        for t in (out_tokens, out_logprobs, out_len, out_reason):  # kept on the host; the broadcast runs on the device
            if self.pp > 1:
                t.copy_(comm.broadcast_from_last_stage(t.to(self.device)).cpu())
        tokens = [out_tokens[i, : out_len[i]].tolist() for i in range(n)]
        logprobs = [out_logprobs[i, : out_len[i]].tolist() for i in range(n)]
        stats = {"wall_s": wall, "busy_s": busy_time, "busy_fraction": busy_time / max(wall, 1e-9), "ticks": tick,
                 "kv_cache_bytes": kv_bytes}  # fmt: skip
        if self.pp > 1:  # every stage's busy and waiting fractions, for the pipeline benchmark
            frac = torch.zeros(2, self.pp, dtype=torch.float64, device=self.device)
            frac[0, self.pp_rank] = stats["busy_fraction"]
            frac[1, self.pp_rank] = self._comm_s / max(wall, 1e-9)
            comm.all_reduce_pp(frac)
            stats["stage_busy_fraction"], stats["stage_comm_fraction"] = frac.tolist()
        return GenerationOutput(tokens, logprobs, [REASONS[int(r)] for r in out_reason], stats)

    def _decide(self, s: int, slots, pending, waiting, mbs) -> torch.Tensor:
        """First stage: the header of this tick -- decode a busy slot, refill a free one, idle, or stop."""
        sl = slots[s]
        if sl is not None and s in pending:
            return torch.tensor([DECODE, s, sl.mb, sl.produced, sl.seq_ids.numel(), 1, 0, 0])
        if sl is None and waiting:
            m = waiting.popleft()
            b, p = mbs[m]["tokens"].shape
            slots[s] = _Slot(m, mbs[m]["seq_ids"], p, mbs[m]["starts"])
            return torch.tensor([PREFILL, s, m, 0, b, p, 0, 0])
        if not waiting and all(x is None for x in slots):
            return torch.tensor([STOP, 0, 0, 0, 0, 0, 0, 0])
        return torch.tensor([IDLE, s, 0, 0, 0, 0, 0, 0])

    def _sample(self, hidden, sl: _Slot, out_tokens, out_logprobs, out_len, out_reason, done) -> torch.Tensor:
        """Last stage: sample token ``sl.produced`` of every sequence, record it, return [2, B] (tokens, done)."""
        logits = vocab_parallel_logits(self.gpt, hidden[-1:], self.fused)[0]  # [B, V/tp]
        vocab_start = ps.get_tensor_model_parallel_rank() * logits.shape[-1]
        ids = sl.seq_ids
        noise_ids = (ids + self._seq_offset).to(logits.device)
        toks, lps = sample_tokens(logits, self.gen.sampling, noise_ids, sl.produced, vocab_start)
        toks, lps = toks.cpu(), lps.cpu()
        j = sl.produced
        active = ~done[ids]
        rows = ids[active]
        out_tokens[rows, j] = toks[active]
        out_logprobs[rows, j] = lps[active]
        last = j + 1 == self.gen.max_new_tokens
        if self.gen.stop_token_ids or self.gen.stop_strings or last:  # else no sequence can end at this token
            reason = torch.full_like(toks, -1)
            if self.gen.stop_token_ids:
                reason[torch.isin(toks, torch.tensor(self.gen.stop_token_ids))] = 1
            if self.gen.stop_strings:
                for row in (active & (reason < 0)).nonzero().flatten().tolist():
                    text = self.decode_text(out_tokens[int(ids[row]), : j + 1].tolist())
                    if any(stop in text for stop in self.gen.stop_strings):
                        reason[row] = 2
            if last:
                reason[reason < 0] = 0
            ending = active & (reason >= 0)
            if bool(ending.any()):
                ended = ids[ending]
                done[ended] = True
                out_len[ended] = j + 1
                out_reason[ended] = reason[ending]
        return torch.stack([toks, done[ids].long()]).to(self.device)


@torch.no_grad()
def generate_full_recompute(model, prompts: list[list[int]], gen: GenerationConfig, pad_id: int) -> GenerationOutput:
    """Reference: no cache, the whole sequence is recomputed for every new token (PP = 1). Same sampler."""
    assert ps.get_pipeline_model_parallel_world_size() == 1, "the reference generator runs without PP"
    device = next(model.parameters()).device
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    live = list(range(n))
    for step in range(gen.max_new_tokens):
        if not live:
            break
        for start in range(0, len(live), gen.micro_batch_size):
            rows = live[start : start + gen.micro_batch_size]
            batch = {k: v.to(device) for k, v in collate_prompts([seqs[i] for i in rows], pad_id).items()}
            hidden = backbone_forward(model.backbone, batch["tokens"], batch["position_ids"], batch["attention_mask"])
            logits = vocab_parallel_logits(model.backbone, hidden[-1:])[0]
            vocab_start = ps.get_tensor_model_parallel_rank() * logits.shape[-1]
            toks, lps = sample_tokens(logits, gen.sampling, torch.tensor(rows, device=device), step, vocab_start)
            for row, i in enumerate(rows):
                t = int(toks[row])
                seqs[i].append(t)
                tokens[i].append(t)
                logprobs[i].append(float(lps[row]))
                if t in gen.stop_token_ids:
                    reasons[i] = "eos"
        live = [i for i in live if reasons[i] == "length"]
    return GenerationOutput(tokens, logprobs, reasons)
