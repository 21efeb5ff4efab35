"""The two records that tasks and verifiers exchange: :class:`Example` (one problem) and
:class:`Verdict` (what a verifier says about one completion).

They live here, apart from ``t2dist.tasks``, because both sides need them: the tasks build
examples and call the verifiers, and the verifiers (``t2dist.verifiers.math``/``choice``)
return verdicts.  With the records in the task package the two packages imported each other;
this module imports nothing of the project, so either side can import it first.
``t2dist.tasks`` and ``t2dist.tasks.base`` re-export both names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One problem.  ``answer`` is the gold reference (a number, a letter, code)."""

    task: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Verdict:
    """What a verifier says about one completion."""

    reward: float  # +1 correct, -1 wrong (the paper's reward)
    correct: bool
    parsed: str | None  # the answer the verifier read from the completion, None if unparsable
    detail: str = ""
    # code tasks: what the judged program does besides defining functions (t2dist.verifiers.audit.KINDS);
    # None where the verifier does not read programs
    flags: tuple[str, ...] | None = None
