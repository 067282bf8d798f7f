"""The ablation's task: chains of single-digit additions and subtractions, solved step by step.

A problem is four digits joined by + or − (``7+5-3+8``) whose running totals never go below 0.
Its trace writes out every operation but the last as a step (``7+5=12``, ``12-3=9``), steps
separated by a blank line (PRG's default step delimiter), then the cue ``\nAnswer: `` and the
answer ``17``: the last operation (9+8) is done in the answer itself. So the answer carries real
uncertainty (one addition or subtraction, on top of any error in the steps), and PRG has
something to measure: each step written out leaves less to work out in the answer. Correctness
is checkable, a tiny model learns the task partly in a short warm-up, and every prompt has the
same length, so a batch of prompts generates without padding.

The problem sets are disjoint and fixed by ``data_seed`` (the same for every seed and arm):
``curated`` (the few labelled traces RD may use), ``queries`` (unlabelled prompts for RLIF),
``val`` (for choosing settings) and ``test`` (held out, reported), and ``many``: ten times the
curated traces (the curated ones and more), for the arm that asks what labelling more would buy.
Warm-up problems are drawn fresh, outside all of them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

CUE = "\nAnswer: "  # the space belongs to the cue, so the answer tokens are its digits alone
STEP_SEPARATOR = "\n\n"
OPERANDS = 4


class CharTokenizer:
    """One token per character of the task's alphabet; 0 is padding, 1 end of sequence."""

    pad_token_id, eos_token_id = 0, 1
    alphabet = "0123456789+-=:\n QAnswer"

    def __init__(self):
        self.chars = sorted(set(self.alphabet))
        self.index = {c: i + 2 for i, c in enumerate(self.chars)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the task's alphabet") from None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)

    def __len__(self) -> int:
        return len(self.chars) + 2


@dataclass(frozen=True)
class Problem:
    digits: tuple
    ops: tuple  # "+" or "-", one fewer than digits

    @property
    def question(self) -> str:
        return str(self.digits[0]) + "".join(op + str(d) for op, d in zip(self.ops, self.digits[1:]))

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\n"

    def totals(self) -> list[int]:
        out = [self.digits[0]]
        for op, d in zip(self.ops, self.digits[1:]):
            out.append(out[-1] + d if op == "+" else out[-1] - d)
        return out

    @property
    def steps(self) -> list[str]:
        t = self.totals()  # every operation but the last, which the answer does
        return [f"{t[i]}{op}{d}={t[i + 1]}" for i, (op, d) in enumerate(zip(self.ops[:-1], self.digits[1:-1]))]

    @property
    def answer(self) -> str:
        return str(self.totals()[-1])

    @property
    def reasoning(self) -> str:
        return STEP_SEPARATOR.join(self.steps)

    @property
    def completion(self) -> str:
        """The gold response after the prompt (without the end-of-sequence token)."""
        return f"{self.reasoning}{CUE}{self.answer}"


def random_problem(rng: random.Random) -> Problem:
    while True:
        p = Problem(tuple(rng.randrange(10) for _ in range(OPERANDS)),
                    tuple(rng.choice("+-") for _ in range(OPERANDS - 1)))
        if min(p.totals()) >= 0:
            return p


def sample(rng: random.Random, n: int, exclude: frozenset = frozenset()) -> list[Problem]:
    out, seen = [], set(exclude)
    while len(out) < n:
        p = random_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@dataclass
class Splits:
    curated: list
    queries: list
    val: list
    test: list
    many: list  # the curated traces first, then more drawn outside every other split

    def held(self) -> frozenset:
        return frozenset(self.curated + self.queries + self.val + self.test + self.many)


def make_splits(data_seed: int = 1234, curated: int = 64, queries: int = 1024, val: int = 200,
                test: int = 500, many: int = 640) -> Splits:
    rng = random.Random(data_seed)
    problems = sample(rng, curated + queries + val + test)
    a, b, c = curated, curated + queries, curated + queries + val
    # drawn after the others, so the four splits are the same whatever ``many`` is
    extra = sample(rng, max(0, many - curated), frozenset(problems))
    return Splits(problems[:a], problems[a:b], problems[b:c], problems[c:], problems[:a] + extra)


def parse_answer(response: str) -> tuple[str, Optional[str]]:
    """(reasoning, answer) of a generated response: the answer is all the text after the first
    cue when it is a whole number (digits only); None when the cue is missing or anything else
    follows it."""
    reasoning, cue, tail = response.partition(CUE)
    return reasoning, tail if cue and tail.isdigit() else None
