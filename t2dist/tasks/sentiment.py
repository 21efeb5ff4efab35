"""Review sentiment for real models (``sentiment``): is a short generated review positive or negative?

The third kind of task of the real-model two-pass (next to ``arith`` and ARC-Easy), chosen because
a small instruct model knows the words but not the task: SmolLM2-135M-Instruct calls almost every
review positive (46% right, n=48, greedy), a bias RL can remove.  (The first candidate, a word
task ``alphabetical``, gained only 42.0% -> 45.5% in 60 steps: the model cannot order the words.)

Prompt::

    Review: The soup was not fresh and the waiter was rude.
    Is this review positive or negative?

One to three clauses ``the <noun> was [not] <adjective>``; every clause has the review's polarity
(a negated adjective of the other polarity counts as this one: "not fresh" is negative), so the
label is unambiguous.  About a third of the clauses are negated, the part a lexical shortcut gets
wrong.  ``chat = "auto"``: an instruct model gets the text as one user turn of its chat template.

Verifier (:class:`~t2dist.tasks.named_option.NamedOptionTask`): the completion's first line must name
exactly one of ``positive`` / ``negative``; echoing the question ("positive or negative") is no answer.
"""
from __future__ import annotations

import random
from typing import Any

from t2dist.tasks.base import Example, register_task
from t2dist.tasks.named_option import NamedOptionTask

NOUNS = ("food service staff pasta room movie soup music coffee hotel waiter pizza bread view price "
         "bed salad book show seat wine dessert guide driver beach lobby tea menu table chef").split()
POSITIVE = ("great wonderful delicious friendly excellent lovely amazing perfect fresh helpful pleasant "
            "superb tasty clean comfortable charming cozy fantastic polite quick warm brilliant").split()
NEGATIVE = ("awful terrible bland rude horrible slow dirty cold stale disappointing noisy boring "
            "greasy overpriced dull cramped unfriendly soggy smelly broken mediocre bad").split()
LABELS = ("positive", "negative")


def clause(rng: random.Random, positive: bool) -> str:
    """``the <noun> was [not] <adj>`` with the polarity ``positive``; negated a third of the time."""
    negated = rng.random() < 1 / 3
    adj = rng.choice(NEGATIVE if positive == negated else POSITIVE)
    return f"the {rng.choice(NOUNS)} was {'not ' if negated else ''}{adj}"


@register_task("sentiment")
class SentimentTask(NamedOptionTask):
    """Say whether a short review is positive or negative."""

    skill = "sentiment"
    max_new_tokens = 8  # "This review is negative" is 4-5 tokens
    option_noun = "label"

    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        positive = rng.random() < 0.5
        text = " and ".join(clause(rng, positive) for _ in range(rng.randint(1, 3)))
        text = text[0].upper() + text[1:] + "."
        label = LABELS[0] if positive else LABELS[1]
        return (f"Review: {text}\nIs this review positive or negative?", label,
                {"negated": " not " in text, "completion": f" {label}\n"})

    def options(self, example: Example) -> tuple[str, ...]:
        return LABELS
