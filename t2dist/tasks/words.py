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

Verifier: the completion's first line must name exactly one of the two words (whole word, any case);
that word is the answer.  Naming both ("apple comes before river") or neither is no answer, so the
reward cannot be earned by listing both words.  Reward +1 / -1.

Words: ``t2dist/assets/words.txt``, 2,000 common lower-case English words of 4-8 letters (the first
2,000 by token id among SmolLM2's whole-word tokens that are entries of the GCIDE dictionary as
packaged by ``english-words`` 2.0.2, MIT): ~3.7M ordered pairs, so the hash splits (1500 / 200 / 400)
are prompt-disjoint and sample the same distribution.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from t2dist.tasks.base import Example, Verdict, register_task
from t2dist.tasks.synthetic import SyntheticTask


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    text = resources.files("t2dist").joinpath("assets/words.txt").read_text(encoding="utf-8")
    return tuple(w for w in text.split() if w)


@register_task("alphabetical")
class AlphabeticalTask(SyntheticTask):
    """Name the word of a pair that comes first in alphabetical order."""

    skill = "words"
    chat = "auto"
    trap_fraction = 0.0
    split_by = "hash"
    sizes = {"train": 1500, "validation": 200, "test": 400}
    max_new_tokens = 12  # a word is 1-3 tokens; a sentence that buries it is cut
    stop = ("\n",)

    def sample(self, rng: random.Random, trap: bool) -> tuple[str, str, dict[str, Any]]:
        words = word_list()
        a = rng.choice(words)
        b = rng.choice(words)
        while b[0] == a[0]:
            b = rng.choice(words)
        first = min(a, b)
        return (f"Q: Which word comes first in alphabetical order: {a} or {b}?\nA:", first,
                {"words": [a, b], "completion": f" {first}\n"})

    def verify(self, completion: str, example: Example) -> Verdict:
        line = (completion or "").strip().split("\n", 1)[0].lower()
        named = [w for w in example.meta["words"] if re.search(rf"\b{re.escape(w)}\b", line)]
        if len(named) != 1:
            return Verdict(-1.0, False, None, "names both words" if named else "names neither word")
        ok = named[0] == example.answer
        return Verdict(1.0 if ok else -1.0, ok, named[0], "the one word named")
