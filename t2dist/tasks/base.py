"""The Task interface and the task registry.

A task owns three deterministic splits of examples, the way a prompt is written
for the model, and a verifier that turns a completion into a reward.  Adding a
task is one class decorated with ``@register_task("name")``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

from t2dist.errors import UserError
from t2dist.task_types import Example, Verdict

SPLITS = ("train", "validation", "test")


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

    #: How the prompt meets the model's chat template: ``"never"`` (raw text, e.g. the synthetic
    #: suite the toy base was pretrained on), ``"auto"`` (wrap the prompt as one user turn when
    #: the tokenizer has a chat template) or ``"required"`` (an error without one).
    chat: ClassVar[str] = "auto"

    def format_prompt(self, example: Example) -> str:
        """The task's own text for ``example`` (the user message, before any chat template)."""
        return example.prompt

    def generation_for(self, example: Example) -> tuple[int, tuple[str, ...]]:
        """``(max_new_tokens, stop)`` for ``example``: the task's own for every example; a task that
        mixes others (``mixed_real``) gives each example its source task's."""
        return self.max_new_tokens, tuple(self.stop or ())

    def prompt_for(self, example: Example, tokenizer=None) -> str:
        """The exact text the model sees (the completion is appended to it): :meth:`format_prompt`,
        wrapped in ``tokenizer``'s chat template according to :attr:`chat`."""
        return apply_chat_template(self.format_prompt(example), tokenizer, self.chat, self.name)

    #: Multiple choice with options shown in the prompt: :meth:`with_answer_at` can reorder them
    #: (``task.option_order: balanced``).
    multiple_choice: ClassVar[bool] = False

    def with_answer_at(self, example: Example, index: int) -> Example:
        """``example`` with its options rotated so the right one is option ``index`` (``index`` modulo
        the number of options); only for :attr:`multiple_choice` tasks."""
        raise NotImplementedError(f"task {self.name!r} has no options to reorder")

    @abstractmethod
    def verify(self, completion: str, example: Example) -> Verdict:
        """Score one completion (the generated text only, prompt excluded)."""

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Verdict]:
        """Score many completions; tasks with expensive verifiers (code) override this."""
        return [self.verify(c, e) for c, e in zip(completions, examples, strict=True)]


class ChatTemplateError(UserError, ValueError):
    """A task needs the model's chat template and the tokenizer has none."""


def apply_chat_template(text: str, tokenizer, mode: str = "auto", task: str = "") -> str:
    """``text`` as one user turn plus the assistant header, or ``text`` unchanged (see ``Task.chat``).

    The template's leading BOS is dropped when the tokenizer adds one itself, so it is not doubled.
    """
    if mode not in ("never", "auto", "required"):
        raise ValueError(f"task {task!r}: chat mode {mode!r} is not one of never, auto, required")
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if mode == "never" or (not template and mode == "auto"):
        return text
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(f"task {task!r} needs a chat (instruct) model, but the tokenizer of {name!r} has no "
                                "chat template; use an instruct model such as 'smollm2' or a hub *-Instruct model")
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and out.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            out = out[len(bos):]
    return out


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


class UnknownTaskError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a registered task by name, or fail naming the known ones.

    Importing this module runs ``t2dist/tasks/__init__.py`` first, which registers the built-in
    tasks, so they are all known here (no import of the package from inside, which was a cycle).
    """
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
