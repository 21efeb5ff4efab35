"""Arithmetic for real models: generated multi-digit ``+``, ``-`` and ``*`` problems, checked as numbers.

The synthetic ``math`` task is shaped for the 0.86M-parameter toy base (``a±b`` with ``b`` ≤ 3 in
a made-up format); a real model needs problems whose difficulty puts its greedy accuracy in the
range where RL has something to learn and something to start from (20-60%).

=============  ====================================================  ================
task           problems (``a op b``, each op one third)             train/val/test
=============  ====================================================  ================
``arith``      one operand 2-9, the other 2-9 or 10-99 (half each)   1500 / 200 / 400
``arith_hard`` one operand 10-99, the other 10-99 or 100-999          5000 / 200 / 500
=============  ====================================================  ================

Why so easy: both small models fail nearly every multi-digit problem in this zero-shot format.
Measured (greedy, 2 shared CPU cores, 20-30 problems per cell, operand sizes as above):

=========================  =====  =====  =====  =====  =====  =====
model                      1d+1d  2d+1d  1d-1d  2d-1d  1d*1d  2d*1d
=========================  =====  =====  =====  =====  =====  =====
SmolLM2 (chat template)     73%    11%    44%     0%    77%    15%
Gemma-3-270M (plain)         5%     0%    24%     0%    67%    10%
=========================  =====  =====  =====  =====  =====  =====

(and 2-3 digit ``+``/``-`` of two multi-digit numbers: 0-15% for both; a few-shot prefix or an
``a + b =`` prompt did not help either model).

Prompt: ``"Q: What is 347 + 582?\\nA:"`` -> `` 929``.  ``chat = "auto"``: an instruct model
(SmolLM2) gets it as one user turn of its chat template, a base model (Gemma-3-270M, which has
no template) the plain text, where the ``Q:/A:`` frame asks for the answer.  Generation stops at
the first newline.

Verifier: the *last* number in the completion ("1,234" and "-7" read as numbers, ``929.0``
equals 929), compared exactly with the integer answer, so "The answer is 929." is right and
"929 - 1 = 928" is wrong — except when the completion starts by restating the problem
("347 + 582 = ..."): then the number right after ``=`` is the answer, because both small models
tend to run on ("13 + 5 = 18 + 5 = 23": 18 was the answer to the question).  Reward +1 / -1.

Splits: deterministic and prompt-disjoint (the :class:`SyntheticTask` machinery: test drawn
first, then validation, then train, from ``random.Random("<task>/<seed>/<split>")``); the test
split has 400 (``arith``) or 500 problems, so a held-out goal on n ≥ 400 fits in it.

Measured greedy test accuracy of ``arith`` (first 100 test problems, 2 shared CPU cores,
``t2dist eval --model M --task arith --split test --limit 100 --json F``, OMP_NUM_THREADS=2):
SmolLM2-135M-Instruct (chat template) 51.0% [41.3-60.6], ~5 min wall; Gemma-3-270M (plain)
23.0% [15.8-32.2], ~5.5 min wall.  Before the restatement rule and with operands 2-9 instead of
0-9: 39% and 19%.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from t2dist.tasks.base import Example, Verdict, register_task
from t2dist.tasks.synthetic import SyntheticTask
from t2dist.verifiers.answers import parse_number
from t2dist.verifiers.math import extract_final_number


@dataclass(frozen=True)
class Level:
    """Operand ranges: ``a`` from one of ``a_ranges`` (chosen uniformly), ``b`` from ``b_range``."""

    a_ranges: tuple[tuple[int, int], ...]
    b_range: tuple[int, int]


def make_problem(rng: random.Random, level: Level) -> tuple[int, str, int, int]:
    """``(a, op, b, answer)``: ``op`` uniform over ``+ - *``; the operands of ``+`` and ``*`` in either
    order; subtraction never goes negative (the larger operand first)."""
    op = rng.choice("+-*")
    a = rng.randint(*rng.choice(level.a_ranges))
    b = rng.randint(*level.b_range)
    if (op == "-" and b > a) or (op != "-" and rng.random() < 0.5):
        a, b = b, a
    return a, op, b, (a + b if op == "+" else a - b if op == "-" else a * b)


class ArithTask(SyntheticTask):
    """Shared sampler and verifier; subclasses set :attr:`level`."""

    skill = "math"
    chat = "auto"  # the chat template when the model has one, the plain Q/A text otherwise
    trap_fraction = 0.0  # no trap subset: every problem is an ordinary one
    split_by = "hash"  # every split the same mix (see SyntheticTask.split_by)
    sizes = {"train": 1500, "validation": 200, "test": 400}
    max_new_tokens = 16  # room for "347 + 582 = 929" (digits are single tokens in SmolLM2 and Gemma)
    stop = ("\n",)
    level: Level

    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        a, op, b, ans = make_problem(rng, self.level)
        return f"Q: What is {a} {op} {b}?\nA:", str(ans), {"a": a, "op": op, "b": b, "completion": f" {ans}\n"}

    @staticmethod
    def _answer_part(completion: str, example: Example) -> str:
        """The text holding the answer: after a restatement ``"a op b ="`` (or ``is``) only its first
        number counts (small models go on: "13 + 5 = 18 + 5 = 23"), otherwise the whole completion."""
        m = example.meta
        if not {"a", "op", "b"} <= m.keys():
            return completion
        head = re.match(rf"\s*{m['a']}\s*{re.escape(m['op'])}\s*{m['b']}\s*(?:=|is\b)\s*", completion)
        if head is None:
            return completion
        first = re.match(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?", completion[head.end():])
        return first.group(0) if first else ""

    def verify(self, completion: str, example: Example) -> Verdict:
        got = extract_final_number(self._answer_part(completion or "", example))
        value = parse_number(got) if got is not None else None
        if value is None:
            return Verdict(-1.0, False, None, "no number")
        ok = value == int(example.answer)
        shown = str(value.numerator) if value.denominator == 1 else str(float(value))
        return Verdict(1.0 if ok else -1.0, ok, shown, "last number")


@register_task("arith")
class Arith(ArithTask):
    # Half the problems have two one-digit operands (0-9), half a two-digit one (10-99) and a
    # one-digit one; ~4,600 distinct prompts, of which only 255 are one-digit pairs, so the
    # splits (test drawn first) hold fewer of those than half (test: ~1/3).  With operands 2-9
    # (no 0 or 1) and the plain last-number rule, Gemma-3-270M scored 19% (n=100).
    level = Level(a_ranges=((0, 9), (10, 99)), b_range=(0, 9))


@register_task("arith_hard")
class ArithHard(ArithTask):
    # Two- and three-digit numbers with a two-digit one (~500k distinct prompts).
    level = Level(a_ranges=((10, 99), (100, 999)), b_range=(10, 99))
    sizes = {"train": 5000, "validation": 200, "test": 500}
