"""A word task for real models: which of two words comes first in alphabetical order (``alphabetical``).

Built as the third kind of task of the real-model two-pass (math, science questions, words); it
did not serve: SmolLM2-135M-Instruct went from 42.0% to 45.5% (n=400) in 60 steps of
``configs/smollm2-alphabetical.yaml``.  The expert learned to answer "X comes first in alphabetical
order" but not to pick X: the model cannot order two words.  ``sentiment`` took its place.

Prompt ``"Q: Which word comes first in alphabetical order: river or apple?\\nA:"`` -> ``apple``.
The two words never share a first letter, so the first letters decide (SmolLM2-135M-Instruct
names the first letter of a word right 88% of the time, n=40, but picks the right word of a pair
only 17% of the time: it answers with a sentence, a third word, or a misspelling).
``chat = "auto"``: an instruct model gets the text as one user turn of its chat template.

Verifier (:class:`~t2dist.tasks.named_option.NamedOptionTask`): the completion's first line must name
exactly one of the two words; naming both ("apple comes before river") or neither is no answer.

Words: ``t2dist/assets/words.txt``, 2,000 common lower-case English words of 4-8 letters (the first
2,000 by token id among SmolLM2's whole-word tokens that are entries of the GCIDE dictionary as
packaged by ``english-words`` 2.0.2, MIT): ~3.7M ordered pairs, so the hash splits (1500 / 200 / 400)
are prompt-disjoint and sample the same distribution.
"""
from __future__ import annotations

import random
from functools import lru_cache
from importlib import resources
from typing import Any

from t2dist.tasks.base import Example, register_task
from t2dist.tasks.named_option import NamedOptionTask


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    text = resources.files("t2dist").joinpath("assets/words.txt").read_text(encoding="utf-8")
    return tuple(w for w in text.split() if w)


@register_task("alphabetical")
class AlphabeticalTask(NamedOptionTask):
    """Name the word of a pair that comes first in alphabetical order."""

    skill = "words"
    max_new_tokens = 12  # a word is 1-3 tokens; a sentence that buries it is cut
    option_noun = "word"

    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        words = word_list()
        a = rng.choice(words)
        b = rng.choice(words)
        while b[0] == a[0]:
            b = rng.choice(words)
        first = min(a, b)
        return (f"Q: Which word comes first in alphabetical order: {a} or {b}?\nA:", first,
                {"words": [a, b], "completion": f" {first}\n"})

    def options(self, example: Example) -> list[str]:
        return example.meta["words"]
