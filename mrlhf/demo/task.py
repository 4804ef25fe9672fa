"""The demo task: arithmetic word problems with a requested answer format, and seeded generators for it.

A problem is `a op b` with two-digit `+` and `-` (a >= b, so answers are non-negative) and single-digit `*`. A prompt
is one question template, optionally followed by a format instruction:

    "Subtract 19 from 64. Answer with just the number."   gold: "45"
    "What is 7 times 8? Answer with the full equation."   gold: "7 * 8 = 56."
    "Add 47 and 38."                                      gold: "47 + 38 = 85."   (no instruction: full equation)

`parse_prompt` inverts rendering exactly, so the judge (`mrlhf.demo.judge`) can grade any prompt made here.
Every generator takes a `numpy.random.Generator`, so a seed fixes its output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

OPS = ("+", "-", "*")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "+": ("What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?", "Compute {a} plus {b}."),
    "-": ("What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?", "Take {b} away from {a}."),
    "*": (
        "What is {a} * {b}?",
        "What is {a} times {b}?",
        "Multiply {a} by {b}.",
        "What is the product of {a} and {b}?",
    ),
}
NUMBER, EQUATION = "number", "equation"
FORMATS = (NUMBER, EQUATION)
INSTRUCTIONS = {NUMBER: "Answer with just the number.", EQUATION: "Answer with the full equation."}
# A prompt without an instruction asks for the full equation.
DEFAULT_FORMAT = EQUATION

OP_WEIGHTS = (0.4, 0.4, 0.2)
# Instruction of a prompt: just the number, the full equation, or none (-> DEFAULT_FORMAT).
INSTRUCTION_CHOICES = (NUMBER, EQUATION, None)
INSTRUCTION_WEIGHTS = (0.4, 0.3, 0.3)
TWO_DIGIT = range(10, 100)
ONE_DIGIT = range(2, 10)

# The simulated demonstrators are sloppy in one systematic way: asked for just the number they still write the full
# equation this often. Above 0.5 the SFT policy's most likely answer to such prompts is the wrong format, so greedy
# SFT decoding loses half credit there and preference data (RM, DPO, PPO) has something clear to fix.
DEMO_IGNORES_NUMBER_INSTRUCTION = 0.6

# Kinds of wrong response and how often wrong_response makes each; "format" keeps the right number.
WRONG_KINDS = ("format", "off_by_one", "off_by_ten", "swapped_digits")
WRONG_WEIGHTS = (0.35, 0.25, 0.2, 0.2)
# A wrong number is written in the requested format this often, else in the other one.
WRONG_NUMBER_IN_REQUESTED_FORMAT = 0.75

Pools = dict[str, list[tuple[int, int]]]


@dataclass(frozen=True)
class Problem:
    """One parsed prompt: operands, operator and the answer format it asks for."""

    a: int
    op: str
    b: int
    fmt: str

    @property
    def key(self) -> tuple[int, str, int]:
        """The problem without its wording or format; held-out splits are disjoint in these."""
        return (self.a, self.op, self.b)

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    def response(self, fmt: str | None = None, value: int | None = None) -> str:
        """The answer text in `fmt` (default: the requested one) stating `value` (default: the right result)."""
        fmt = fmt or self.fmt
        value = self.result if value is None else value
        return str(value) if fmt == NUMBER else f"{self.a} {self.op} {self.b} = {value}."

    @property
    def gold(self) -> str:
        """The one response that scores 1.0."""
        return self.response()


def operand_pairs(op: str) -> list[tuple[int, int]]:
    """Every (a, b) of the problem space of `op`, in a fixed order."""
    if op == "*":
        return [(a, b) for a in ONE_DIGIT for b in ONE_DIGIT]
    return [(a, b) for a in TWO_DIGIT for b in TWO_DIGIT if op == "+" or a >= b]


def split_pools(rng: np.random.Generator, eval_fraction: float, num_eval_mul: int) -> tuple[Pools, Pools]:
    """Split the problem space into disjoint (train, eval) pools, op -> sorted list of (a, b).

    `+` and `-` hold out `eval_fraction` of their problems. The 64 products are too few to hold out a fraction of
    without leaving entries the policy can never learn, so `num_eval_mul` off-diagonal products are held out, each
    with its commuted twin (7 * 8 for 8 * 7) kept in train.
    """
    train: Pools = {}
    held: Pools = {}
    for op in ("+", "-"):
        pairs = operand_pairs(op)
        chosen = set(rng.choice(len(pairs), size=round(eval_fraction * len(pairs)), replace=False).tolist())
        held[op] = [p for i, p in enumerate(pairs) if i in chosen]
        train[op] = [p for i, p in enumerate(pairs) if i not in chosen]
    lower = [(a, b) for a, b in operand_pairs("*") if a < b]
    picks = rng.choice(len(lower), size=num_eval_mul, replace=False)
    flips = rng.random(num_eval_mul) < 0.5
    held["*"] = sorted(lower[i][::-1] if flip else lower[i] for i, flip in zip(picks.tolist(), flips.tolist()))
    train["*"] = [p for p in operand_pairs("*") if p not in set(held["*"])]
    return train, held


def render(problem: Problem, template: int, instructed: bool) -> str:
    """Prompt text: question template number `template`, then the format instruction if `instructed`."""
    question = QUESTIONS[problem.op][template].format(a=problem.a, b=problem.b)
    return f"{question} {INSTRUCTIONS[problem.fmt]}" if instructed else question


def make_problem(rng: np.random.Generator, pools: Pools | None = None) -> tuple[str, str]:
    """A random `(prompt, gold response)`; operands come from `pools` (op -> list of (a, b)), else the full space."""
    op = OPS[rng.choice(len(OPS), p=OP_WEIGHTS)]
    pairs = pools[op] if pools is not None else operand_pairs(op)
    a, b = pairs[int(rng.integers(len(pairs)))]
    template = int(rng.integers(len(QUESTIONS[op])))
    instruction = INSTRUCTION_CHOICES[rng.choice(len(INSTRUCTION_CHOICES), p=INSTRUCTION_WEIGHTS)]
    problem = Problem(a, op, b, instruction or DEFAULT_FORMAT)
    return render(problem, template, instruction is not None), problem.gold


def _question_pattern(template: str) -> str:
    # re.escape turns "{a}" into "\{a\}"; swap those for digit groups.
    escaped = re.escape(template)
    return escaped.replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")


_INSTRUCTION_GROUP = "|".join(re.escape(text) for text in INSTRUCTIONS.values())
_PROMPT_PATTERNS = [
    (op, re.compile(rf"{_question_pattern(t)}(?: (?P<instruction>{_INSTRUCTION_GROUP}))?"))
    for op, templates in QUESTIONS.items()
    for t in templates
]
_FORMAT_OF_INSTRUCTION = {text: fmt for fmt, text in INSTRUCTIONS.items()}


def parse_prompt(prompt: str) -> Problem:
    """Parse a prompt made by `render`, bare or rendered with the chat template; raises ValueError otherwise.

    With the chat template (`<|user|>\\n...\\n<|assistant|>\\n`) the last user turn is the question.
    """
    text = prompt
    if "<|user|>" in text:
        text = text.rsplit("<|user|>", 1)[1].split("<|", 1)[0]
    text = text.strip()
    for op, pattern in _PROMPT_PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            instruction = m.group("instruction")
            fmt = _FORMAT_OF_INSTRUCTION[instruction] if instruction else DEFAULT_FORMAT
            return Problem(int(m.group("a")), op, int(m.group("b")), fmt)
    raise ValueError(f"not a demo task prompt: {prompt!r}")


def _other(fmt: str) -> str:
    return EQUATION if fmt == NUMBER else NUMBER


def demonstration(prompt: str, rng: np.random.Generator) -> str:
    """A simulated human demonstration: the gold response, but often the full equation when asked for the number."""
    problem = parse_prompt(prompt)
    if problem.fmt == NUMBER and rng.random() < DEMO_IGNORES_NUMBER_INSTRUCTION:
        return problem.response(EQUATION)
    return problem.gold


def wrong_value(result: int, kind: str, rng: np.random.Generator) -> int:
    """A plausible wrong result of `kind`: off by one, off by ten, or the digits swapped; never `result` or < 0."""
    step = {"off_by_one": 1, "off_by_ten": 10}.get(kind, 1)
    if kind == "swapped_digits":
        swapped = int(str(result)[::-1])
        if swapped != result:
            return swapped
    sign = 1 if rng.random() < 0.5 or result < step else -1
    return result + sign * step


def wrong_response(prompt: str, rng: np.random.Generator) -> str:
    """A response that scores below 1: the right number in the wrong format, or a plausible wrong number."""
    problem = parse_prompt(prompt)
    kind = WRONG_KINDS[rng.choice(len(WRONG_KINDS), p=WRONG_WEIGHTS)]
    if kind == "format":
        return problem.response(_other(problem.fmt))
    value = wrong_value(problem.result, kind, rng)
    fmt = problem.fmt if rng.random() < WRONG_NUMBER_IN_REQUESTED_FORMAT else _other(problem.fmt)
    return problem.response(fmt, value)
