"""Typed samples every reader produces and every dataset consumes.

A conversation prefix is a list of ``Turn``s; the response(s) are plain assistant text. ``source`` locates the record
(path, 1-based line) so later stages (tokenization, length checks) can still name file and line in errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Source:
    path: str
    line: int | None = None


@dataclass(frozen=True)
class SFTSample:
    """A prompt (one or more turns, ending with a user turn) and the assistant response to learn."""

    prompt: tuple[Turn, ...]
    response: str
    source: Source = field(default=Source("<memory>"), compare=False)


@dataclass(frozen=True)
class PreferenceSample:
    """A prompt and two responses, ``chosen`` preferred over ``rejected``; optional margin for the RM loss."""

    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    margin: float | None = None
    source: Source = field(default=Source("<memory>"), compare=False)


@dataclass(frozen=True)
class PromptSample:
    """A prompt alone (PPO rollouts, evaluation), with the record's other fields as ``columns``.

    ``columns`` holds every field of the record but the prompt's own ("prompt" or "messages"), as parsed JSON, for
    programmatic rewards (``ppo.reward_function``), e.g. a ``ground_truth`` answer. It is left out of equality and
    hashing, since a dict cannot be hashed.
    """

    prompt: tuple[Turn, ...]
    source: Source = field(default=Source("<memory>"), compare=False)
    columns: dict[str, Any] = field(default_factory=dict, compare=False)


Sample = SFTSample | PreferenceSample | PromptSample
