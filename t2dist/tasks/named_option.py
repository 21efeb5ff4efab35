"""Generated questions for real models whose answer is one of a few named options.

``sentiment`` (positive / negative) and ``alphabetical`` (one of the two words of the prompt) share
everything but their options: an instruct model gets the text as one user turn of its chat template
(``chat = "auto"``), hash splits of 1500 / 200 / 400 prompts that sample one distribution, a
newline stop, and this verifier: the completion's first line must name exactly one option (whole
word, any case), and that option is the answer.  Naming several ("positive or negative", "apple
comes before river") or none is no answer, so the reward cannot be earned by listing the options.
Reward +1 / -1.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from t2dist.tasks.base import Example, Verdict
from t2dist.tasks.synthetic import SyntheticTask


class NamedOptionTask(SyntheticTask):
    """A :class:`SyntheticTask` answered by naming one of :meth:`options`."""

    chat = "auto"
    trap_fraction = 0.0
    split_by = "hash"
    sizes = {"train": 1500, "validation": 200, "test": 400}
    stop = ("\n",)
    option_noun = "option"  # what the verdict's reason calls an option ("label", "word")

    def options(self, example: Example) -> Sequence[str]:
        """The lower-case options the answer is one of (``example.answer`` among them)."""
        raise NotImplementedError

    def verify(self, completion: str, example: Example) -> Verdict:
        line = (completion or "").strip().split("\n", 1)[0].lower()
        named = [w for w in self.options(example) if re.search(rf"\b{re.escape(w)}\b", line)]
        if len(named) != 1:
            return Verdict(-1.0, False, None, f"names {'several' if named else 'no'} {self.option_noun}s")
        ok = named[0] == example.answer
        return Verdict(1.0 if ok else -1.0, ok, named[0], f"the one {self.option_noun} named")
