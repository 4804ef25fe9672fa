"""The gold judge of the demo task: an exact, programmatic stand-in for human labellers.

    1.0  the response is exactly the gold response (right number, requested format), ignoring surrounding whitespace
    0.5  the last integer in the response is the right result, but the text is not the requested format
    0.0  otherwise

Generation often runs past the answer: the response is cut at the first end-of-text or chat-role marker before
grading.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mrlhf.demo.task import parse_prompt

PARTIAL_CREDIT = 0.5
STOP_MARKERS = ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>")
_INTEGER = re.compile(r"-?\d+")


def clean_response(response: str) -> str:
    """The response up to the first stop marker, without surrounding whitespace."""
    for marker in STOP_MARKERS:
        response = response.split(marker, 1)[0]
    return response.strip()


def gold_response(prompt: str) -> str:
    """The response that scores 1.0 for `prompt`; raises ValueError if the prompt is not a demo task prompt."""
    return parse_prompt(prompt).gold


def score(prompt: str, response: str) -> float:
    """Score `response` to `prompt` in [0, 1]; raises ValueError naming the prompt if it cannot be parsed."""
    problem = parse_prompt(prompt)
    text = clean_response(response)
    if text == problem.gold:
        return 1.0
    numbers = _INTEGER.findall(text)
    if numbers and int(numbers[-1]) == problem.result:
        return PARTIAL_CREDIT
    return 0.0


def judge_batch(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Mean score, accuracy (fraction scoring 1.0) and count `n` over paired prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"judge_batch got {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("judge_batch needs at least one prompt")
    scores = [score(p, r) for p, r in zip(prompts, responses)]
    return {
        "mean": sum(scores) / len(scores),
        "accuracy": sum(s == 1.0 for s in scores) / len(scores),
        "n": len(scores),
    }


def reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """The gold judge as a PPO reward function (``ppo.reward_function: mrlhf.demo.judge:reward``, TRL's reward-function
    signature): verifiable rewards on the demo task, in place of a learned reward model. Token ids and prompt-row
    columns are not needed and ignored."""
    return [score(p, r) for p, r in zip(prompts, completions)]
