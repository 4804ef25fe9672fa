"""One pipeline stage's share of a serving tick: decode the busy rows of a ring slot, prefill newly admitted rows,
and (last stage) choose the next token of every sequence of the work item.

Built from the generator's pieces (``fast_decode``, ``backbone_forward``, the KV cache's ``DecodeState``,
vocab-parallel sampling) rather than its fixed-batch loop: here every row of a slot is its own sequence at its own
position, so rows join and leave between ticks. The prompts admitted in one tick are prefilled together, left-padded
as the generator does, into a scratch cache whose rows are then copied into theirs; a row remembers its padding
(``start``), so its position is its column minus its start. A free row inside the decoded range is fed a dummy token
at column 0 (overwritten by the next prefill).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps

from mrlhf.data.collate import collate_prompts
from mrlhf.generation.fast_decode import decode_layers, decode_plan, embed, supports
from mrlhf.generation.sampling import SamplingParams, sample_tokens, vocab_parallel_logsumexp
from mrlhf.models.backbone import backbone_forward
from mrlhf.models.heads import vocab_parallel_logits
from mrlhf.ops.kv_cache import DecodeState, KVCache, decoding
from mrlhf.ops.kv_ops import has_decode_linear
from mrlhf.parallel import comm


@dataclass
class Prefill:
    """The prompts entering the slot at one tick, one left-padded batch; prompt ``i`` fills ``rows[i]`` (its n choices
    share one forward and copy its cache row)."""

    prompts: list[list[int]]
    rows: list[list[int]]

    @property
    def width(self) -> int:
        return max(len(p) for p in self.prompts)


@dataclass
class Work:
    """What stage 0 started at one tick; every stage runs it one tick after the stage before it."""

    slot: int
    rows: int  # decoded rows [0, rows) of the slot (0: no decode)
    cols: list[int]  # [rows] cache column of each row's input token (0 for a free row)
    starts: list[int]  # [rows] left padding of each row's prompt
    tokens: list[int]  # [rows] input token of each row (pad for a free row)
    decoded: list[int]  # the busy rows among [0, rows), ascending
    prefill: Prefill | None = None
    lanes: list = field(default_factory=list)  # the sequence of each result row: decoded rows, then prefill rows
    top: int = 0  # alternatives per result row (the most any of its sequences asked for)
    sampling: list[tuple[SamplingParams, int, int]] = field(default_factory=list)  # (params, step, choice) per row

    @property
    def hidden_rows(self) -> int:
        """Rows of the activation this work item passes between stages: decode rows, then the prefill batch."""
        pf = self.prefill
        return self.rows + (0 if pf is None else pf.width * len(pf.prompts))


class StageRunner:
    """The model on this rank's stage, its KV cache ``[layers, slots, rows, context, groups, head_dim]``."""

    def __init__(self, model, slots: int, rows: int, context: int, pad_id: int, fused_linear: bool = True) -> None:
        self.gpt = model.backbone
        cfg = self.gpt.config
        self.hidden = cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.pad_id = pad_id
        self.layer_offset = self.gpt.decoder.layers[0].layer_number - 1
        self.rope = getattr(self.gpt, "rotary_pos_emb", None)
        self.fast = supports(self.gpt)
        self.fused = self.fast and fused_linear and has_decode_linear(self.device)
        self.plan = decode_plan(self.gpt) if self.fast else None
        groups = cfg.num_query_groups // ps.get_tensor_model_parallel_world_size()
        self.cache = KVCache(len(self.gpt.decoder.layers), slots, rows, context, groups, cfg.kv_channels, self.dtype,
                             self.device)  # fmt: skip

    @torch.no_grad()
    def run(self, work: Work, inbox: torch.Tensor | None) -> torch.Tensor:
        """This stage's output for ``work``: hidden rows [hidden_rows, h] for the next stage, or on the last stage
        the result rows [len(lanes), 2 + 2 * top] (token, log-prob, alternative ids, their log-probs; float64)."""
        outs, last_rows = [], []
        offset = 0
        if work.rows:
            inp = None if inbox is None else inbox[: work.rows].view(1, work.rows, self.hidden)
            dec = self._decode(work, inp)  # [1, rows, h]
            outs.append(dec[0])
            last_rows.append(dec[0, work.decoded])
            offset = work.rows
        if work.prefill is not None:
            pf = work.prefill
            b, w = len(pf.prompts), pf.width
            inp = None if inbox is None else inbox[offset : offset + w * b].view(w, b, self.hidden)
            hid = self._prefill(work.slot, pf, inp)  # [w, b, h]
            outs.append(hid.reshape(w * b, self.hidden))
            last_rows += [hid[-1, i : i + 1].expand(len(rows), self.hidden) for i, rows in enumerate(pf.rows)]
        if not self.last:
            return torch.cat(outs).contiguous()
        return self._sample(work, torch.cat(last_rows))

    def _decode(self, work: Work, inp: torch.Tensor | None) -> torch.Tensor:
        b = work.rows
        cols = torch.tensor(work.cols, dtype=torch.long)
        host_pos = cols - torch.tensor(work.starts, dtype=torch.long)  # logical positions (left padding skipped)
        col, pos = cols.to(self.device), host_pos.to(self.device)
        state = DecodeState(
            cache=self.cache, slot=work.slot, batch=b, layer_offset=self.layer_offset, prefill=False,
            write_pos=col, starts=torch.tensor(work.starts, dtype=torch.long, device=self.device), lengths=col + 1,
        )  # fmt: skip
        if self.rope is not None:
            emb = self.rope(int(host_pos.max()) + 1)[pos][:, 0, 0]  # [B, D] at each row's own position
            state.cos, state.sin = torch.cos(emb).to(self.dtype), torch.sin(emb).to(self.dtype)
        toks = torch.tensor(work.tokens, dtype=torch.long, device=self.device).view(b, 1)
        if self.fast:
            hidden = embed(self.gpt, self.plan, toks, pos.view(b, 1)) if self.first else inp
            return decode_layers(self.gpt, hidden, state, self.fused, self.plan)
        with decoding(state):
            return backbone_forward(self.gpt, toks, pos.view(b, 1), None, input_tensor=inp, rope=self.rope is None)

    def _prefill(self, slot: int, pf: Prefill, inp: torch.Tensor | None) -> torch.Tensor:
        """megatron's forward of the left-padded batch [b, w] into a scratch cache, then each prompt's cache row copied
        into the rows of its choices. Returns hidden states [w, b, h]."""
        batch = {k: v.to(self.device) for k, v in collate_prompts(pf.prompts, self.pad_id).items()}
        b, w = batch["tokens"].shape
        c = self.cache
        scratch = KVCache(c.k.shape[0], 1, b, w, c.k.shape[-2], c.k.shape[-1], self.dtype, self.device)
        state = DecodeState(cache=scratch, slot=0, batch=b, layer_offset=self.layer_offset, prefill=True,
                            write_pos=torch.zeros(b, dtype=torch.long, device=self.device))  # fmt: skip
        with decoding(state):
            hidden = backbone_forward(self.gpt, batch["tokens"], batch["position_ids"], batch["attention_mask"],
                                      input_tensor=inp)  # fmt: skip
        src = torch.tensor([i for i, rows in enumerate(pf.rows) for _ in rows], device=self.device)
        dst = torch.tensor([r for rows in pf.rows for r in rows], device=self.device)
        c.k[:, slot, dst, :w] = scratch.k[:, 0, src]
        c.v[:, slot, dst, :w] = scratch.v[:, 0, src]
        scratch.free()
        return hidden

    def _sample(self, work: Work, hidden: torch.Tensor) -> torch.Tensor:
        """Tokens for every result row. Greedy rows are chosen together; sampled rows in groups of one (params, step),
        each row's noise keyed by (seed, choice, step) so a seeded request repeats whatever else is in the ring."""
        logits = vocab_parallel_logits(self.gpt, hidden[None], self.fused)[0]  # [M, V/tp]
        vocab_start = ps.get_tensor_model_parallel_rank() * logits.shape[-1]
        m = logits.shape[0]
        out = torch.zeros((m, 2 + 2 * work.top), dtype=torch.float64, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for i, (params, step, _) in enumerate(work.sampling):
            groups.setdefault(("greedy",) if params.greedy else (params, step), []).append(i)
        for idx in groups.values():
            params, step, _ = work.sampling[idx[0]]
            rows = torch.tensor(idx, device=logits.device)
            choices = torch.tensor([work.sampling[i][2] for i in idx], device=logits.device)
            toks, lps = sample_tokens(logits[rows], params, choices, step, vocab_start)
            out[rows, 0], out[rows, 1] = toks.double(), lps.double()
        if work.top:
            temps = torch.tensor([s[0].temperature or 1.0 for s in work.sampling], device=logits.device)
            ids, lps = top_logprobs(logits.float() / temps[:, None], work.top, vocab_start)
            out[:, 2 : 2 + work.top], out[:, 2 + work.top :] = ids.double(), lps.double()
        return out


def top_logprobs(scaled: torch.Tensor, k: int, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely global ids of each row of vocab-parallel ``scaled`` logits [M, V/tp] and their log-probs
    (descending): each TP rank's local top k, gathered, merged; the log-sum-exp is vocab-parallel."""
    lse = vocab_parallel_logsumexp(scaled)  # [M]
    vals, idx = scaled.topk(min(k, scaled.shape[-1]), dim=-1)
    all_vals = torch.cat(comm.all_gather_tp(vals), dim=-1)
    all_ids = torch.cat(comm.all_gather_tp(idx + vocab_start), dim=-1)
    best, pick = all_vals.topk(k, dim=-1)
    return all_ids.gather(-1, pick), best - lse[:, None]
