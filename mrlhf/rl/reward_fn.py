"""``ppo.reward_function``: scores from a Python function instead of a reward model (verifiable rewards).

It is called the way TRL's ``GRPOTrainer`` calls its reward functions (by keyword), so one written for TRL works::

    def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float]

``prompts`` is the prompt as the policy saw it (rendered with the chat template, BOS dropped), ``completions`` the
sampled text up to and without EOS, ``completion_ids`` its token ids; each further keyword is one field of the prompt
rows (a list, one value per response, None where a row lacks the field). A function may take only what it needs and
``**kwargs`` for the rest. It is imported once at start-up, called on tensor-parallel rank 0 of the last pipeline
stage for that data-parallel rank's samples, and its scores are broadcast to the other TP ranks -- so a function that
is slow, random or calls a service runs once per sample and every TP rank agrees. Any error it raises, a wrong number
of scores or a score that is not a number is a one-line ``RewardFunctionError`` on every TP rank; None, NaN or inf
means "no reward": the sample is dropped with a warning, as for a reward model's non-finite score.
"""

from __future__ import annotations

import importlib
import numbers
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state as ps

from mrlhf.errors import ConfigError, MrlhfError
from mrlhf.parallel import comm
from mrlhf.rl.experience import Experience

RESERVED = ("prompts", "completions", "completion_ids")


class RewardFunctionError(MrlhfError):
    """The reward function failed or answered something that is not one score per response."""


def load(spec: str, field: str = "ppo.reward_function") -> Callable[..., Any]:
    """Import ``module:callable`` (dots allowed on both sides); a one-line ConfigError naming ``field``, the entry
    and what is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field}={spec}: cannot import module '{module_name}': {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}={spec}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}={spec}: '{attr}' is a {type(obj).__name__}, not a function")
    return obj


def texts(exp: Experience, tokenizer, eos_id: int) -> tuple[list[str], list[str], list[list[int]]]:
    """Prompt text, response text and response token ids (EOS dropped) of every row of ``exp``; the prompt ends where
    the response starts (``response_start``). One host copy of the tokens, not one per row. Token ids the tokenizer
    does not have (a model whose embedding is wider than the tokenizer, as Qwen2's is, can sample its unused rows)
    are left out of the text rather than failing the decode."""
    vocab = tokenizer.vocab_size
    rows, starts, lengths = exp.tokens.tolist(), exp.response_start.tolist(), exp.response_length.tolist()
    prompts, responses, ids = [], [], []
    for row, start, length in zip(rows, starts, lengths):
        prompt, response = row[: start + 1], row[start + 1 : start + 1 + length]
        if prompt and prompt[0] == tokenizer.bos_id:
            prompt = prompt[1:]
        if response and response[-1] == eos_id:
            response = response[:-1]
        prompts.append(tokenizer.decode([t for t in prompt if t < vocab]))
        responses.append(tokenizer.decode([t for t in response if t < vocab]))
        ids.append(response)
    return prompts, responses, ids


def columns_of(dataset, prompt_index: list[int]) -> dict[str, list[Any]]:
    """The prompt rows' fields as keyword columns: one list per field name, None where a row lacks it."""
    rows = [dataset.columns(i) if hasattr(dataset, "columns") else {} for i in prompt_index]
    names = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in names}


class RewardFunction:
    """The loaded ``ppo.reward_function`` entries (summed with their weights) and the prompt dataset whose rows give
    their columns."""

    def __init__(self, specs: list[str] | str, tokenizer, dataset, eos_id: int,
                 weights: list[float] | None = None, field: str = "ppo.reward_function") -> None:  # fmt: skip
        """``field``: the config entry the functions came from (named in every error)."""
        self.specs = [specs] if isinstance(specs, str) else list(specs)
        self.spec = ",".join(self.specs)
        self.field = field
        self.fns = [load(spec, field) for spec in self.specs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.specs)
        self.tokenizer, self.dataset, self.eos_id = tokenizer, dataset, eos_id
        self.seconds = 0.0
        """Wall time of the last call (TP rank 0 of the last stage; 0 elsewhere)."""
        self.parts = [(0.0, 0.0)] * len(self.specs)
        """Per function, the sum and count of its finite scores in the last call (TP rank 0 of the last stage)."""

    @property
    def names(self) -> list[str]:
        """A metric name per function: its callable's name, with the entry's index where two share one."""
        base = [spec.rsplit(":", 1)[1].replace(".", "_") for spec in self.specs]
        return [b if base.count(b) == 1 else f"{b}_{i}" for i, b in enumerate(base)]

    def call(self, prompts: list[str], responses: list[str], columns: dict[str, list[Any]],
             completion_ids: list[list[int]] | None = None, index: int = 0) -> list[float]:  # fmt: skip
        """Function ``index``'s scores, checked: one real number (or bool) per response; None, NaN and inf mean no
        reward."""
        spec, fn = self.specs[index], self.fns[index]
        clash = [k for k in RESERVED if k in columns]
        if clash:
            raise RewardFunctionError(
                f"{self.field}={spec}: the prompt rows have a field named {clash[0]!r}, which would clash "
                f"with the function's own '{clash[0]}' argument: rename it in the data"
            )
        try:
            out = fn(prompts=prompts, completions=responses, completion_ids=completion_ids, **columns)
        except Exception as e:  # the user's code: one line naming it, the exception and where it was raised
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise RewardFunctionError(
                f"{self.field}={spec} raised {type(e).__name__}: {e} (at {where.filename}:{where.lineno}; "
                f"first response {responses[0]!r} to {prompts[0]!r})"
            ) from None
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().flatten().tolist()
        try:
            scores = list(out)
        except TypeError:
            raise RewardFunctionError(
                f"{self.field}={spec} returned a {type(out).__name__}, not a list of {len(responses)} scores"
            ) from None
        if len(scores) != len(responses):
            raise RewardFunctionError(
                f"{self.field}={spec} returned {len(scores)} scores for {len(responses)} responses"
            )
        for i, v in enumerate(scores):
            if v is not None and not isinstance(v, numbers.Real):
                raise RewardFunctionError(
                    f"{self.field}={spec}: score {i} is {v!r} ({type(v).__name__}), not a number "
                    f"(response {responses[i]!r})"
                )
        return [float("nan") if v is None else float(v) for v in scores]

    def score(self, exp: Experience) -> torch.Tensor:
        """[b] float32 scores of the rows of ``exp``, in row order: the weighted sum over the functions that gave a
        finite score, NaN where none did (no process group needed)."""
        start = time.perf_counter()
        prompts, responses, ids = texts(exp, self.tokenizer, self.eos_id)
        columns = columns_of(self.dataset, exp.prompt_index.tolist())
        each = torch.tensor([self.call(prompts, responses, columns, ids, k) for k in range(len(self.fns))],
                            dtype=torch.float64)  # [functions, b]  # fmt: skip
        finite = torch.isfinite(each)
        weighted = torch.where(finite, each * torch.tensor(self.weights, dtype=torch.float64)[:, None], 0.0)
        total = torch.where(finite.any(0), weighted.sum(0), float("nan"))
        self.parts = [(float(torch.where(f, e, 0.0).sum()), float(f.sum())) for e, f in zip(each, finite)]
        self.seconds = time.perf_counter() - start
        return total.float()

    def __call__(self, exp: Experience, device: torch.device) -> torch.Tensor:
        """[b] float32 scores of this DP rank's rows: computed on TP rank 0, broadcast over TP (last stage only). A
        failure on TP rank 0 is broadcast too (the last element), so every TP rank raises instead of waiting."""
        out = torch.zeros(exp.batch_size + 1, dtype=torch.float32, device=device)  # scores, then 1 = failed
        self.seconds, self.parts, error = 0.0, [(0.0, 0.0)] * len(self.fns), None
        if ps.get_tensor_model_parallel_rank() == 0:
            try:
                out[:-1].copy_(self.score(exp))
            except RewardFunctionError as e:
                error = e
                out[-1] = 1.0
        comm.broadcast_from_tp_rank0(out)
        if error is not None:
            raise error
        if out[-1].item():
            raise RewardFunctionError(f"{self.field}={self.spec} failed on tensor-parallel rank 0 (its error "
                                      "says why)")  # fmt: skip
        return out[:-1]
