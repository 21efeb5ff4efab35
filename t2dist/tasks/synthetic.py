"""The synthetic task suite the toy base is pretrained on.

Trained skills (used for RL experts):

=========  =====  ==============================================  ====================
task       skill  prompt -> completion                            trap subset
=========  =====  ==============================================  ====================
math       math   ``Q: 347+3=\\nA:`` -> `` 350\\n``              a units carry (trap
                                                                  answer forgets it: 340)
                                                                  or a units borrow in
                                                                  ``a-b`` (trap: forgets
                                                                  it, 351-2 -> 359)
code       code   ``Q: add 3, mul 4\\nA: lambda x:``              add/sub followed by mul
                  -> `` (x+3)*4\\n``                              (trap: the precedence
                                                                  bug ``x+3*4``)
reasoning  reas.  ``Q: min? A)34 B)71 C)12 D)55\\nA:`` -> `` C\\n``  ``min?`` questions (trap
                                                                  letter: the maximum)
=========  =====  ==============================================  ====================

Unseen variants (``unseen = True``; in the pretraining corpus but never RL-trained):

* ``math_mc`` (math): the ``math`` problems asked as 4-way multiple choice
  ``Q: 347+3=? A)350 B)340 C)360 D)349\\nA:`` -> `` A\\n``; the carry / borrow trap
  distractor is always among the options on trap prompts.
* ``code3`` (code): three-step compositions ``Q: add 3, mul 4, sub 2\\nA: lambda x:``
  -> `` (x+3)*4-2\\n``; trap: any add/sub followed later by mul (trap: no parentheses).

Splits are deterministic functions of a per-task seed and prompt-disjoint:
test is drawn first, then validation, then train, each rejecting prompts already
taken.  Exactly ``round(TRAP_FRACTION * size)`` examples of each split are trap
prompts.  Sizes (train / validation / test): 4000 / 200 / 400 for ``reasoning``
and ``code3``; 3000 / 200 / 400 for ``math`` and ``math_mc`` (~5,900 distinct
prompts, ~1,190 traps); 2400 / 200 / 400 for ``code`` (~5,850 distinct prompts,
~1,040 traps).

Every example's ``meta`` holds ``trap`` (bool), ``trap_answer`` (the systematic
wrong answer the pretraining corpus gives on trap prompts 65% of the time) and
what the verifier needs (``options`` for multiple choice, ``tests`` for code).
"""
from __future__ import annotations

import hashlib
import random
import string
from functools import cached_property
from typing import Any, Callable, Sequence

from t2dist.tasks.base import Example, Task, Verdict, check_split, register_task
from t2dist.verifiers.choice import check_choice
from t2dist.verifiers.code import check_code_batch
from t2dist.verifiers.math import check_math

TRAP_FRACTION = 0.3
LETTERS = string.ascii_uppercase

# A sampler draws one problem of the task's distribution: (prompt, answer, meta).
Sampler = Callable[[random.Random, bool], tuple[str, str, dict[str, Any]]]


class SyntheticTask(Task):
    """Shared split machinery: subclasses implement :meth:`sample`."""

    seed: int = 0
    sizes: dict[str, int] = {"train": 4000, "validation": 200, "test": 400}
    chat = "never"  # raw "Q: ...\nA:" text: the format the toy base was pretrained on, for any model
    trap_fraction: float = TRAP_FRACTION
    # How a prompt's split is chosen.  "order": test is drawn first, then validation, then train, each
    # rejecting prompts already taken (the toy suite; its bench results depend on it).  "hash": a
    # prompt belongs to the split its hash falls in (shares proportional to ``sizes``), so every split
    # samples the same distribution even when a part of it has few distinct prompts (``arith``: only
    # 255 one-digit pairs, which "order" would give mostly to test).
    split_by: str = "order"

    def __init__(self, seed: int | None = None):
        if seed is not None:
            self.seed = seed

    # -- distribution -------------------------------------------------------
    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        """One problem; ``trap`` selects the trap subset.  Must be deterministic given ``rng``."""
        raise NotImplementedError

    def make_example(self, rng: random.Random, trap: bool) -> Example:
        prompt, answer, meta = self.sample(rng, trap)
        meta = dict(meta)
        meta["trap"] = bool(trap)
        return Example(self.name, prompt, answer, meta)

    # -- splits ---------------------------------------------------------------
    @cached_property
    def _splits(self) -> dict[str, list[Example]]:
        seen: set[str] = set()
        out: dict[str, list[Example]] = {}
        for split_no, split in enumerate(("test", "validation", "train")):
            n = self.sizes[split]
            n_trap = round(self.trap_fraction * n)
            rng = random.Random(f"{self.name}/{self.seed}/{split}")
            flags = [True] * n_trap + [False] * (n - n_trap)
            rng.shuffle(flags)
            examples = []
            for trap in flags:
                for _ in range(100_000):
                    ex = self.make_example(rng, trap)
                    if ex.prompt not in seen and self._in_split(ex.prompt, split):
                        break
                else:  # pragma: no cover - pools are sized to avoid this
                    raise RuntimeError(f"{self.name}: prompt pool exhausted for split {split}")
                seen.add(ex.prompt)
                examples.append(ex)
            out[split] = examples
        return out

    def _in_split(self, prompt: str, split: str) -> bool:
        if self.split_by == "order":
            return True
        if self.split_by != "hash":
            raise ValueError(f"{self.name}: split_by must be 'order' or 'hash', not {self.split_by!r}")
        h = int.from_bytes(hashlib.sha256(f"{self.name}/{self.seed}/{prompt}".encode()).digest()[:8], "big")
        u, lo = h / 2**64, 0.0
        total = sum(self.sizes.values())
        for name in ("test", "validation", "train"):
            hi = lo + self.sizes[name] / total
            if lo <= u < hi or (name == "train" and u >= lo):
                return name == split
            lo = hi
        return False

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def reference_completion(self, example: Example) -> str:
        """The gold answer as the pretraining corpus writes it (``t2dist eval --oracle``)."""
        return " " + example.answer

    def heldout_prompts(self) -> set[str]:
        """Prompts of validation and test: never to be used for (pre)training."""
        return {e.prompt for s in ("validation", "test") for e in self._splits[s]}

    def corpus_examples(self, n: int, seed: int, trap_fraction: float | None = None) -> list[Example]:
        """``n`` fresh problems of this task's distribution, excluding validation/test prompts."""
        held = self.heldout_prompts()
        frac = self.trap_fraction if trap_fraction is None else trap_fraction
        rng = random.Random(f"{self.name}/{self.seed}/corpus/{seed}")
        out = []
        while len(out) < n:
            ex = self.make_example(rng, rng.random() < frac)
            if ex.prompt not in held:
                out.append(ex)
        return out


# ----------------------------------------------------------------------------- math
def _arith(rng: random.Random, trap: bool) -> tuple[int, str, int, int, int]:
    """(a, op, b, answer, trap_answer): a two- or three-digit number plus or minus 1, 2 or 3.

    (Small steps keep the units table learnable by the 0.86M-parameter toy base in
    1000 steps; with ``b`` up to 9 it stayed near 20% after 1000 steps.)

    Trap subset: additions whose units carry (trap answer forgets the carry: a+b-10)
    and subtractions whose units borrow (trap answer forgets the borrow: a-b+10).
    """
    op = "+" if rng.random() < 0.5 else "-"
    while True:
        a, b = rng.randint(10, 999), rng.randint(1, 3)
        if op == "+":
            if ((a % 10 + b) >= 10) == trap:
                ans = a + b
                return a, op, b, ans, (ans - 10 if trap else ans)
        else:
            if ((a % 10) < b) == trap:
                ans = a - b
                return a, op, b, ans, (ans + 10 if trap else ans)


class _MathBase(SyntheticTask):
    skill = "math"
    # ~5,900 distinct prompts, ~1,190 of them traps: train is 3000 to keep 30% traps.
    sizes = {"train": 3000, "validation": 200, "test": 400}


@register_task("math")
class MathTask(_MathBase):
    """Two-digit addition/subtraction, answer as an integer."""

    max_new_tokens = 6

    def sample(self, rng, trap):
        a, op, b, ans, trap_ans = _arith(rng, trap)
        return f"Q: {a}{op}{b}=\nA:", str(ans), {"trap_answer": str(trap_ans), "completion": f" {ans}\n"}

    def verify(self, completion: str, example: Example) -> Verdict:
        return check_math(completion, example.answer)


def _mc(rng: random.Random, correct: str, distractors: Sequence[str], n: int = 4) -> tuple[list[str], str]:
    """Shuffle ``correct`` with ``n-1`` distractors; returns (options, gold letter)."""
    opts = [correct] + list(distractors[: n - 1])
    rng.shuffle(opts)
    return opts, LETTERS[opts.index(correct)]


def _fmt_options(options: Sequence[str]) -> str:
    return " ".join(f"{LETTERS[i]}){o}" for i, o in enumerate(options))


class _ChoiceMixin:
    def verify(self, completion: str, example: Example) -> Verdict:
        return check_choice(completion, example.answer, len(example.meta.get("options", "ABCD")))


@register_task("math_mc")
class MathMCTask(_ChoiceMixin, _MathBase):
    """Unseen: the math problems as 4-way multiple choice (same carry / sign trap)."""

    unseen = True
    max_new_tokens = 4

    def sample(self, rng, trap):
        a, op, b, ans, trap_ans = _arith(rng, trap)
        pool = [ans + 10, ans - 10, ans + 1, ans - 1, ans + 2, ans - 2, ans + 100, ans - 100]
        pool = [d for d in dict.fromkeys(pool) if d != ans and d != trap_ans]
        rng.shuffle(pool)
        distractors = ([trap_ans] if trap else []) + pool
        opts, gold = _mc(rng, str(ans), [str(d) for d in distractors])
        trap_letter = LETTERS[opts.index(str(trap_ans))] if trap else gold
        return (
            f"Q: {a}{op}{b}=? {_fmt_options(opts)}\nA:",
            gold,
            {"options": opts, "trap_answer": trap_letter, "value": str(ans), "completion": f" {gold}\n"},
        )


# ----------------------------------------------------------------------------- code
_TEST_INPUTS = (-3, 0, 1, 2, 5, 7)


def _compose(steps: Sequence[tuple[str, int]], parens: bool = True) -> str:
    """Left-to-right expression of ``steps`` applied to x; ``parens=False`` is the precedence bug."""
    expr, additive = "x", False
    for op, k in steps:
        if op == "mul":
            if additive and parens:
                expr = f"({expr})"
            expr, additive = f"{expr}*{k}", False if parens else additive
        else:
            expr, additive = f"{expr}{'+' if op == 'add' else '-'}{k}", True
    return expr


def _apply(steps: Sequence[tuple[str, int]], x: int) -> int:
    for op, k in steps:
        x = x + k if op == "add" else x - k if op == "sub" else x * k
    return x


def _is_trap(steps: Sequence[tuple[str, int]]) -> bool:
    return _compose(steps, True) != _compose(steps, False)


class _CodeBase(SyntheticTask):
    skill = "code"
    n_steps: tuple[int, ...] = (1, 2)
    add_range = (1, 29)
    mul_range = (2, 19)
    single_step_prob = 0.05

    def _steps(self, rng: random.Random) -> list[tuple[str, int]]:
        n = self.n_steps[0] if rng.random() < self.single_step_prob else self.n_steps[-1]
        steps = []
        for _ in range(n):
            op = rng.choice(("add", "sub", "mul"))
            k = rng.randint(*self.mul_range) if op == "mul" else rng.randint(*self.add_range)
            steps.append((op, k))
        return steps

    def sample(self, rng, trap):
        while True:
            steps = self._steps(rng)
            if _is_trap(steps) == trap:
                break
        expr = _compose(steps)
        tests = "\n".join(f"assert f({x}) == {_apply(steps, x)}" for x in _TEST_INPUTS)
        prompt = "Q: " + ", ".join(f"{op} {k}" for op, k in steps) + "\nA: lambda x:"
        return prompt, expr, {
            "tests": tests,
            "trap_answer": _compose(steps, parens=False),
            "completion": f" {expr}\n",
        }

    @staticmethod
    def program(completion: str) -> str:
        """The program the sandbox runs: the completion as the body of ``lambda x:``."""
        body = (completion or "").split("\n", 1)[0].strip()
        return f"f = lambda x: {body}\n"

    def verify(self, completion: str, example: Example) -> Verdict:
        return self.verify_batch([completion], [example])[0]

    def verify_batch(self, completions, examples) -> list[Verdict]:
        completions, examples = list(completions), list(examples)
        if len(completions) != len(examples):
            raise ValueError("completions and examples differ in length")
        programs = [self.program(c) for c in completions]
        checks = check_code_batch(programs, [e.meta["tests"] for e in examples])
        out = []
        for c, chk in zip(completions, checks):
            body = (c or "").split("\n", 1)[0].strip()
            out.append(Verdict(1.0 if chk.passed else -1.0, bool(chk.passed), body or None, chk.status))
        return out


@register_task("code")
class CodeTask(_CodeBase):
    """Write the body of ``lambda x:`` for a one- or two-step recipe of add/sub/mul."""

    sizes = {"train": 2400, "validation": 200, "test": 400}
    max_new_tokens = 12


@register_task("code3")
class Code3Task(_CodeBase):
    """Unseen: three-step recipes (single-digit constants)."""

    unseen = True
    n_steps = (3,)
    add_range = (1, 9)
    mul_range = (2, 9)
    single_step_prob = 0.0
    max_new_tokens = 14


# ----------------------------------------------------------------------------- reasoning
@register_task("reasoning")
class ReasoningTask(_ChoiceMixin, SyntheticTask):
    """Pick the largest (``max?``) or smallest (``min?``) of four two-digit numbers.

    Trap subset: the ``min?`` questions, whose systematic distractor is the maximum.
    """

    skill = "reasoning"
    max_new_tokens = 4

    def sample(self, rng, trap):
        nums = rng.sample(range(10, 100), 4)
        kind = "min" if trap else "max"
        target = min(nums) if trap else max(nums)
        opts = [str(n) for n in nums]
        gold = LETTERS[nums.index(target)]
        trap_letter = LETTERS[nums.index(max(nums))]
        return (
            f"Q: {kind}? {_fmt_options(opts)}\nA:",
            gold,
            {"options": opts, "trap_answer": trap_letter, "completion": f" {gold}\n"},
        )


SUITE = ("math", "code", "reasoning", "math_mc", "code3")
TRAINED = ("math", "code", "reasoning")
UNSEEN = ("math_mc", "code3")
