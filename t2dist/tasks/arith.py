"""Arithmetic for real models: generated multi-digit ``+``, ``-`` and ``*`` problems, checked as numbers.

The synthetic ``math`` task is shaped for the 0.86M-parameter toy base (``a±b`` with ``b`` ≤ 3 in
a made-up format); a real model needs problems whose difficulty puts its greedy accuracy in the
range where RL has something to learn and something to start from (20-60%).

=============  ====================================================  ===============
task           problems (a op b, each op one third)                  max_new_tokens
=============  ====================================================  ===============
``arith``      ``+``: 2-3 digit + 2-3 digit; ``-``: 2-3 digit minus   16
               a smaller 2-3 digit number; ``*``: 2 digit × 1 digit
``arith_hard`` ``+``/``-``: 3-4 digits; ``*``: 2 digit × 2 digit      16
=============  ====================================================  ===============

Prompt: ``"Q: What is 347 + 582?\\nA:"`` -> `` 929``.  ``chat = "auto"``: an instruct model
(SmolLM2) gets it as one user turn of its chat template, a base model (Gemma-3-270M, which has
no template) the plain text, where the ``Q:/A:`` frame asks for the answer.  Generation stops at
the first newline.

Verifier: the *last* number in the completion ("1,234" and "-7" read as numbers, ``929.0``
equals 929), compared exactly with the integer answer, so "347 + 582 = 929" and "The answer
is 929." are right and "929 - 1 = 928" is wrong.  Reward +1 / -1, like every task.

Splits: deterministic and prompt-disjoint (the :class:`SyntheticTask` machinery: test drawn
first, then validation, then train, from ``random.Random("<task>/<seed>/<split>")``); 5000 /
200 / 500 problems, so a held-out goal on n ≥ 400 fits in the test split.

Measured greedy test accuracy (first 100 test problems, ``t2dist eval --limit 100``, 2 shared
CPU cores): see the README's real-model section.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from t2dist.tasks.base import Example, Verdict, register_task
from t2dist.tasks.synthetic import SyntheticTask


@dataclass(frozen=True)
class Level:
    """Digit counts (inclusive ranges) of the operands, per operation."""

    add: tuple[tuple[int, int], tuple[int, int]]
    sub: tuple[tuple[int, int], tuple[int, int]]
    mul: tuple[tuple[int, int], tuple[int, int]]


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def make_problem(rng: random.Random, level: Level) -> tuple[int, str, int, int]:
    """``(a, op, b, answer)``: ``op`` uniform over ``+ - *``; subtraction never goes negative."""
    op = rng.choice("+-*")
    digits = {"+": level.add, "-": level.sub, "*": level.mul}[op]
    a, b = _operand(rng, digits[0]), _operand(rng, digits[1])
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b, (a + b if op == "+" else a - b if op == "-" else a * b)


class ArithTask(SyntheticTask):
    """Shared sampler and verifier; subclasses set :attr:`level`."""

    skill = "math"
    chat = "auto"  # the chat template when the model has one, the plain Q/A text otherwise
    trap_fraction = 0.0  # no trap subset: every problem is an ordinary one
    sizes = {"train": 5000, "validation": 200, "test": 500}
    max_new_tokens = 16  # room for "347 + 582 = 929" (digits are single tokens in SmolLM2 and Gemma)
    stop = ("\n",)
    level: Level

    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        a, op, b, ans = make_problem(rng, self.level)
        return f"Q: What is {a} {op} {b}?\nA:", str(ans), {"a": a, "op": op, "b": b, "completion": f" {ans}\n"}

    def verify(self, completion: str, example: Example) -> Verdict:
        from t2dist.verifiers.answers import parse_number
        from t2dist.verifiers.math import extract_final_number

        got = extract_final_number(completion or "")
        value = parse_number(got) if got is not None else None
        if value is None:
            return Verdict(-1.0, False, None, "no number")
        ok = value == int(example.answer)
        shown = str(value.numerator) if value.denominator == 1 else str(float(value))
        return Verdict(1.0 if ok else -1.0, ok, shown, "last number")


@register_task("arith")
class Arith(ArithTask):
    level = Level(add=((2, 3), (2, 3)), sub=((2, 3), (2, 3)), mul=((2, 2), (1, 1)))


@register_task("arith_hard")
class ArithHard(ArithTask):
    level = Level(add=((3, 4), (3, 4)), sub=((3, 4), (3, 4)), mul=((2, 2), (2, 2)))
