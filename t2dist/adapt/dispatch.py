"""The first pass: ask the model which kind of task a prompt is, and read its answer.

The dispatch prompt is ``template.format(prompt=...)``; the model completes it with a
category name (``math``, ``code``, ``reasoning`` or ``other``).  A tiny model (or a
big one) does not always answer with a clean word, so :func:`parse_label` reads the
first word case-insensitively, accepts an unambiguous prefix (``"reas"`` ->
``reasoning``) and maps anything it cannot read to ``other`` — a prompt the
classifier cannot place is answered by the base model, never by a wrong expert.
"""
from __future__ import annotations

import re
from typing import Sequence

from t2dist.errors import UserError

# The toy base is pretrained on this template (t2dist.toy.corpus); keep it short: the
# toy corpus packs documents into 64-token rows.
DEFAULT_TEMPLATE = "Which task?\n{prompt}\nKind:"
CATEGORIES: tuple[str, ...] = ("math", "code", "reasoning", "other")
OTHER = "other"
# A few synonyms a real instruct model tends to answer with.
SYNONYMS = {
    "arithmetic": "math", "maths": "math", "mathematics": "math",
    "programming": "code", "coding": "code", "python": "code", "program": "code",
    "logic": "reasoning", "choice": "reasoning", "multiple": "reasoning",
    "science": "reasoning", "scientific": "reasoning",  # ARC-Easy's grade-school science (dispatch_real)
    "review": "sentiment", "reviews": "sentiment", "opinion": "sentiment", "feelings": "sentiment",
    "emotion": "sentiment", "emotions": "sentiment",  # a review's sentiment (dispatch_real)
}


class DispatchError(UserError, ValueError):
    """A bad dispatch template or category set (raised before any model work)."""


def check_template(template: str) -> str:
    """``template`` must contain ``{prompt}`` exactly once and no other field."""
    try:
        out = template.format(prompt="\x00")
    except (KeyError, IndexError, ValueError) as err:
        raise DispatchError(f"adapt.template {template!r} must contain only the field {{prompt}}: {err}") from None
    if out.count("\x00") != 1:
        raise DispatchError(f"adapt.template {template!r} must contain {{prompt}} exactly once")
    return template


def dispatch_prompt(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.format(prompt=prompt)


def parse_label(text: str | None, categories: Sequence[str] = CATEGORIES) -> str:
    """The category named by the start of ``text``; ``other`` when it names none.

    Case and surrounding whitespace/punctuation are ignored; a prefix of at least two
    letters that fits exactly one category counts (``"Reas"``, ``"ma"``); a whole
    category word (or a synonym of one: ``science`` for ``reasoning``) anywhere in the first line
    counts when the first word is not one.
    """
    cats = [c.lower() for c in categories]
    other = OTHER if OTHER in cats else cats[-1]
    if not text:
        return other
    line = text.strip().split("\n", 1)[0].lower()
    words = re.findall(r"[a-z]+", line)
    if not words:
        return other
    first = words[0]
    if first in cats:
        return first
    if first in SYNONYMS and SYNONYMS[first] in cats:
        return SYNONYMS[first]
    if len(first) >= 2:
        hits = [c for c in cats if c.startswith(first)]
        if len(hits) == 1:
            return hits[0]
    for w in words[1:]:
        if w in cats:
            return w
        if SYNONYMS.get(w) in cats:
            return SYNONYMS[w]
    return other
