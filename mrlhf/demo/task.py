"""The demo task: arithmetic word problems with a requested answer format, and seeded generators for it.

A problem is `a op b` with single-digit operands: `+` on 0-9, `-` on 0-9 with a >= b (answers are non-negative) and
`*` on 2-9. A prompt is one question template, optionally followed by a format instruction:

    "Subtract 3 from 7. Answer with just the number."     gold: "4"
    "What is 7 times 8? Answer with the full equation."   gold: "7 * 8 = 56."
    "Add 4 and 9."                                        gold: "4 + 9 = 13."   (no instruction: full equation)

The whole prompt space is small (219 problems x 4 wordings x 3 instruction choices = 2628 strings), so held-out data
is held out by prompt *string*, not by problem: `split_pools` sets aside a few (wording, instruction) combinations of
every problem, and the problem itself stays in training in its other combinations.

`parse_prompt` inverts rendering exactly, so the judge (`mrlhf.demo.judge`) can grade any prompt made here.
Every generator takes a `numpy.random.Generator`, so a seed fixes its output.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
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
INSTRUCTION_WEIGHTS = (0.5, 0.25, 0.25)
ADD_SUB_OPERANDS = range(0, 10)
MUL_OPERANDS = range(2, 10)

# The simulated demonstrators are sloppy in one systematic way: asked for just the number they still write the full
# equation this often. Above 0.5 the SFT policy's most likely answer to such prompts is the wrong format, so greedy
# SFT decoding loses half credit there and preference data (RM, DPO, PPO) has something clear to fix. At 0.8 the
# 2-layer demo policy saw too few bare answers to learn to compute without writing the equation out: PPO taught it the
# format but the numbers were wrong (0.838 at seed 3); at 0.6 the same run scores 0.922 (benchmarks/RESULTS.md).
DEMO_IGNORES_NUMBER_INSTRUCTION = 0.6

# Kinds of wrong response. The first two keep the right number (the judge gives 0.5): the other format, or the
# equation with its operands swapped ("8 + 7 = 15." for "What is 7 + 8?"). The last two state a wrong number.
FORMAT_KINDS = ("format", "swapped_operands")
NUMBER_KINDS = ("off_by_one", "off_by_two_or_ten")
WRONG_KINDS = FORMAT_KINDS + NUMBER_KINDS
WRONG_WEIGHTS = (0.35, 0.15, 0.3, 0.2)
# A wrong number is written in the requested format this often, else in the other one.
WRONG_NUMBER_IN_REQUESTED_FORMAT = 0.75

# One prompt string: (a, op, b, question template number, instruction or None for no instruction).
PromptKey = tuple[int, str, int, int, str | None]
# A set of prompt strings to draw from, as a tuple of keys in `prompt_space()` order.
Pool = tuple[PromptKey, ...]


@dataclass(frozen=True)
class Problem:
    """One parsed prompt: operands, operator and the answer format it asks for."""

    a: int
    op: str
    b: int
    fmt: str

    @property
    def key(self) -> tuple[int, str, int]:
        """The problem without its wording or format."""
        return (self.a, self.op, self.b)

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    def response(self, fmt: str | None = None, value: int | None = None, swapped: bool = False) -> str:
        """The answer text in `fmt` (default: the requested one) stating `value` (default: the right result).

        `swapped` writes the equation's operands the other way round (`b op a = value.`).
        """
        fmt = fmt or self.fmt
        value = self.result if value is None else value
        a, b = (self.b, self.a) if swapped else (self.a, self.b)
        return str(value) if fmt == NUMBER else f"{a} {self.op} {b} = {value}."

    @property
    def gold(self) -> str:
        """The one response that scores 1.0."""
        return self.response()


def operand_pairs(op: str) -> list[tuple[int, int]]:
    """Every (a, b) of the problem space of `op`, in a fixed order."""
    if op == "*":
        return [(a, b) for a in MUL_OPERANDS for b in MUL_OPERANDS]
    return [(a, b) for a in ADD_SUB_OPERANDS for b in ADD_SUB_OPERANDS if op == "+" or a >= b]


def prompt_space() -> list[PromptKey]:
    """Every prompt string of the task as a key, in a fixed order (problem, then template, then instruction)."""
    return [
        (a, op, b, template, instruction)
        for op in OPS
        for a, b in operand_pairs(op)
        for template in range(len(QUESTIONS[op]))
        for instruction in INSTRUCTION_CHOICES
    ]


def prompt_probability(key: PromptKey) -> float:
    """How likely `make_problem` without a pool is to draw `key`; these sum to 1 over `prompt_space()`."""
    a, op, b, _template, instruction = key
    return (
        OP_WEIGHTS[OPS.index(op)]
        / len(operand_pairs(op))
        / len(QUESTIONS[op])
        * INSTRUCTION_WEIGHTS[INSTRUCTION_CHOICES.index(instruction)]
    )


def split_pools(rng: np.random.Generator, held_out_per_problem: int) -> tuple[Pool, Pool]:
    """Split the prompt space into disjoint (train, held-out) pools of prompt strings.

    For every problem, `held_out_per_problem` of its (template, instruction) combinations are chosen uniformly at
    random and held out; the problem's other combinations stay in train. Every problem is therefore in train, and
    the held-out prompts test reading a seen problem in an unseen combination of wording and instruction.
    """
    combos = [(t, i) for t in range(len(QUESTIONS["+"])) for i in INSTRUCTION_CHOICES]
    held: set[PromptKey] = set()
    for op in OPS:
        for a, b in operand_pairs(op):
            for c in rng.choice(len(combos), size=held_out_per_problem, replace=False).tolist():
                held.add((a, op, b, *combos[c]))
    space = prompt_space()
    return tuple(k for k in space if k not in held), tuple(k for k in space if k in held)


def render_key(key: PromptKey) -> str:
    """The prompt text of `key`."""
    a, op, b, template, instruction = key
    problem = Problem(a, op, b, instruction or DEFAULT_FORMAT)
    return render(problem, template, instruction is not None)


def gold_of_key(key: PromptKey) -> str:
    """The gold response to the prompt of `key`."""
    a, op, b, _template, instruction = key
    return Problem(a, op, b, instruction or DEFAULT_FORMAT).gold


def render(problem: Problem, template: int, instructed: bool) -> str:
    """Prompt text: question template number `template`, then the format instruction if `instructed`."""
    question = QUESTIONS[problem.op][template].format(a=problem.a, b=problem.b)
    return f"{question} {INSTRUCTIONS[problem.fmt]}" if instructed else question


@functools.lru_cache(maxsize=8)
def pool_probabilities(pool: Pool) -> np.ndarray:
    """The task's prompt distribution restricted to `pool` (same order), renormalised."""
    p = np.array([prompt_probability(k) for k in pool])
    return p / p.sum()


def make_problem(rng: np.random.Generator, pool: Pool | None = None) -> tuple[str, str]:
    """A random `(prompt, gold response)` from the task's distribution, restricted to `pool` if given."""
    if pool is not None:
        key = pool[int(rng.choice(len(pool), p=pool_probabilities(pool)))]
        return render_key(key), gold_of_key(key)
    op = OPS[rng.choice(len(OPS), p=OP_WEIGHTS)]
    pairs = operand_pairs(op)
    a, b = pairs[int(rng.integers(len(pairs)))]
    template = int(rng.integers(len(QUESTIONS[op])))
    instruction = INSTRUCTION_CHOICES[rng.choice(len(INSTRUCTION_CHOICES), p=INSTRUCTION_WEIGHTS)]
    key = (a, op, b, template, instruction)
    return render_key(key), gold_of_key(key)


def instruction_quotas(n: int, available: Sequence[int]) -> list[int]:
    """Split `n` over INSTRUCTION_CHOICES in proportion to INSTRUCTION_WEIGHTS, at most `available[i]` to choice i.

    A choice that runs out passes its share on to the others, in proportion to their weights.
    """
    if n > sum(available):
        raise ValueError(f"cannot pick {n} distinct prompts from a pool of {sum(available)}")
    quotas = [0] * len(available)
    while sum(quotas) < n:
        open_ = [i for i, q in enumerate(quotas) if q < available[i]]
        total = sum(INSTRUCTION_WEIGHTS[i] for i in open_)
        left = n - sum(quotas)
        shares = {i: left * INSTRUCTION_WEIGHTS[i] / total for i in open_}
        # Largest remainder rounding; ties go to the earlier choice.
        rounded = {i: int(shares[i]) for i in open_}
        for i in sorted(open_, key=lambda i: (rounded[i] - shares[i], i))[: left - sum(rounded.values())]:
            rounded[i] += 1
        for i in open_:
            quotas[i] = min(available[i], quotas[i] + rounded[i])
    return quotas


def distinct_prompts(rng: np.random.Generator, pool: Pool, n: int) -> list[str]:
    """`n` distinct prompts from `pool`, in random order.

    Drawing distinct prompts flattens the task's distribution towards the pool's make-up, so the instruction mix is
    imposed exactly: `instruction_quotas` many prompts of each instruction choice, each drawn without replacement
    from the pool's prompts with that choice (weighted by the task's distribution, which fixes the operator mix).
    """
    strata = [[k for k in pool if k[4] == choice] for choice in INSTRUCTION_CHOICES]
    picks: list[PromptKey] = []
    for stratum, quota in zip(strata, instruction_quotas(n, [len(s) for s in strata])):
        chosen = rng.choice(len(stratum), size=quota, replace=False, p=pool_probabilities(tuple(stratum)))
        picks += [stratum[i] for i in chosen.tolist()]
    return [render_key(picks[i]) for i in rng.permutation(len(picks)).tolist()]


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
    """A plausible wrong result of `kind` (off by one; off by two, or by ten for two-digit results); never `result`
    and never negative."""
    step = 1
    if kind == "off_by_two_or_ten":
        step = 10 if result >= 10 and rng.random() < 0.5 else 2
    sign = 1 if rng.random() < 0.5 or result < step else -1
    return result + sign * step


def wrong_response(prompt: str, rng: np.random.Generator, kind: str | None = None) -> str:
    """A response that scores below 1, of `kind` (one of WRONG_KINDS; default drawn with WRONG_WEIGHTS).

    Kinds in FORMAT_KINDS keep the right number and score 0.5: the other format, or the equation with its operands
    swapped (the other format if the operands are equal, where swapping changes nothing). Kinds in NUMBER_KINDS state
    a wrong number, in the requested format WRONG_NUMBER_IN_REQUESTED_FORMAT of the time, and score 0.
    """
    problem = parse_prompt(prompt)
    if kind is None:
        kind = WRONG_KINDS[rng.choice(len(WRONG_KINDS), p=WRONG_WEIGHTS)]
    if kind == "swapped_operands" and problem.a != problem.b:
        return problem.response(EQUATION, swapped=True)
    if kind in FORMAT_KINDS:
        return problem.response(_other(problem.fmt))
    if kind not in NUMBER_KINDS:
        raise ValueError(f"unknown wrong-response kind {kind!r}; expected one of {WRONG_KINDS}")
    value = wrong_value(problem.result, kind, rng)
    fmt = problem.fmt if rng.random() < WRONG_NUMBER_IN_REQUESTED_FORMAT else _other(problem.fmt)
    return problem.response(fmt, value)
