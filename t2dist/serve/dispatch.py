"""The first pass of ``model=auto``, made cheap: read the start of the prompt, stop when the label is decided.

The question is the one ``t2dist adapt`` asks (:class:`t2dist.adapt.strategies.TwoPass.classify`):
the dispatch task's template around the user's text, its chat mode, the written start of the
answer (``It is a`` on ``dispatch_real``), greedy, at most the task's new tokens, stop at a
newline, the label read by :func:`t2dist.adapt.dispatch.parse_label`.  Two things make it cheaper:

* **The start of the prompt only.**  The user's text is cut to its first
  ``serve.dispatch_prompt_tokens`` tokens before it goes into the question (default 64: a
  ``mixed_real`` prompt is 20-200 tokens; an ARC-Easy question names its kind in its first
  sentence).  A prompt shorter than the cut is asked exactly as ``t2dist adapt`` asks it.
* **Stop when the label is decided.**  :func:`label_decided` is true as soon as the answer's first
  word is complete and names a category by itself (a category, a synonym, an unambiguous prefix):
  ``parse_label`` then returns that category whatever follows, so stopping there gives the label
  of the whole generation, exactly (a first word that decides nothing, e.g. ``a`` in
  ``a math problem``, lets generation go on, and the later words count as before).
  On ``dispatch_real`` that is 2 of the 4 new tokens (`` science`` and the space that ends it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from t2dist.adapt.dispatch import OTHER, SYNONYMS, dispatch_prompt, parse_label
from t2dist.tasks.base import apply_chat_template

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class DispatchSpec:
    """How the first pass asks (from ``adapt.dispatch_task`` / ``adapt.template``) and reads."""

    template: str
    chat: str
    answer_prefix: str
    max_new_tokens: int
    prompt_tokens: int | None  # serve.dispatch_prompt_tokens (None: the whole prompt)
    categories: tuple[str, ...]  # auto's categories plus ``other``
    stop: tuple[str, ...] = ("\n",)


def truncate(text: str, tokenizer, max_tokens: int | None) -> str:
    """The first ``max_tokens`` tokens of ``text`` as text (``text`` itself when it is not longer)."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def question(text: str, tokenizer, spec: DispatchSpec) -> str:
    """The first-pass prompt for the user's ``text`` (as ``TwoPass.classify`` writes it, after the cut)."""
    q = dispatch_prompt(truncate(text, tokenizer, spec.prompt_tokens), spec.template)
    return apply_chat_template(q, tokenizer, spec.chat, "dispatch") + spec.answer_prefix


def _decisive(word: str, cats: Sequence[str]) -> bool:
    if word in cats or SYNONYMS.get(word) in cats:
        return True
    return len(word) >= 2 and sum(c.startswith(word) for c in cats) == 1


def label_decided(categories: Sequence[str]) -> Callable[[str], bool]:
    """``f(text)``: true once ``parse_label(text + anything)`` can no longer change (module docstring)."""
    cats = [c.lower() for c in categories]

    def decided(text: str) -> bool:
        line = text.lstrip().split("\n", 1)[0].lower()
        m = _WORD.search(line)
        return bool(m) and m.end() < len(line) and _decisive(m.group(0), cats)

    return decided


def read_label(text: str, categories: Sequence[str]) -> str:
    return parse_label(text, list(categories))


def route(label: str, routes: dict[str, str]) -> str | None:
    """The expert name of a label (None: the base answers; ``other`` and unknown labels)."""
    return None if label == OTHER else routes.get(label)
