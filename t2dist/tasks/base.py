"""The Task interface and the task registry.

A task owns three deterministic splits of examples, the way a prompt is written
for the model, and a verifier that turns a completion into a reward.  Adding a
task is one class decorated with ``@register_task("name")``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

SPLITS = ("train", "validation", "test")


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


class Task(ABC):
    """Base class of every task.

    Subclasses set ``name`` (registry key), ``skill`` (the dispatch category:
    ``math``, ``code`` or ``reasoning``) and ``unseen`` (kept out of RL training,
    used by the adaptation stage), and implement :meth:`examples` and :meth:`verify`.
    """

    name: ClassVar[str] = ""
    skill: ClassVar[str] = ""
    unseen: ClassVar[bool] = False
    max_new_tokens: ClassVar[int] = 16
    stop: ClassVar[tuple[str, ...]] = ("\n",)

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """All examples of ``split`` (one of SPLITS), in a fixed order."""

    def format_prompt(self, example: Example) -> str:
        """The text the model sees; the completion is appended to it."""
        return example.prompt

    @abstractmethod
    def verify(self, completion: str, example: Example) -> Verdict:
        """Score one completion (the generated text only, prompt excluded)."""

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Verdict]:
        """Score many completions; tasks with expensive verifiers (code) override this."""
        return [self.verify(c, e) for c, e in zip(completions, examples, strict=True)]


TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: ``@register_task("math")`` makes the task available by name."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a registered task by name, or fail naming the known ones."""
    from t2dist import tasks as _all  # noqa: F401  (importing registers the built-in tasks)

    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
