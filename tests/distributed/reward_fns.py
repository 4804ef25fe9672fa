"""Reward functions of the ``ppo.reward_function`` distributed tests (imported by name in the forked ranks).

Each call appends ``tp pp dp responses nans`` to a file of the directory ``$REWARD_CALLS`` (when set), so a test can
see which ranks ran the function and for how many responses.
"""

from __future__ import annotations

import os

from megatron.core import parallel_state as ps

from mrlhf.demo.task import parse_prompt


def _log(responses: list[str], nans: int = 0) -> None:
    directory = os.environ.get("REWARD_CALLS")
    if directory:
        coord = (
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(),
        )
        with open(os.path.join(directory, f"calls.{os.getpid()}"), "a") as f:
            f.write(f"{coord[0]} {coord[1]} {coord[2]} {len(responses)} {nans}\n")


def checked_length(prompts: list[str], completions: list[str], answer: list[int], **kwargs) -> list[float]:
    """A score random text varies in (its length and its digits); first checks that each prompt came with its own
    row's ``answer`` column (the demo result of that prompt), so misaligned columns fail the run."""
    for p, a in zip(prompts, answer):
        if parse_prompt(p).result != a:
            raise ValueError(f"column 'answer'={a} does not belong to prompt {p!r}")
    _log(completions)
    return [0.1 * len(r) + sum(c.isdigit() for c in r) for r in completions]


def nan_for_sums(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """NaN ("no reward") for the responses to addition prompts, the length elsewhere."""
    """None (TRL's "not applicable") for the responses to addition prompts, the length elsewhere."""
    scores = [None if parse_prompt(p).op == "+" else 0.1 * len(r) for p, r in zip(prompts, completions)]
    _log(completions, sum(s is None for s in scores))
    return scores


def const_one(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    return [1.0] * len(completions)


def broken(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    raise KeyError("verifier service unreachable")


def eval_scored(prompts: list[str], completions: list[str], answer: list[int], **kwargs) -> list[float]:
    """``checked_length``'s score (the prompt's own ``answer`` column checked first), each call's scores appended as
    one JSON line to ``$EVAL_CALLS/evals.<pid>`` with this rank's coordinates."""
    import json

    scores = checked_length(prompts, completions, answer)
    directory = os.environ.get("EVAL_CALLS")
    if directory:
        coord = [ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                 ps.get_data_parallel_rank()]  # fmt: skip
        with open(os.path.join(directory, f"evals.{os.getpid()}"), "a") as f:
            f.write(json.dumps({"coord": coord, "prompts": prompts, "scores": scores}) + "\n")
    return scores
