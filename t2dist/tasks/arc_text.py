"""ARC-Easy answered with the option's *text* instead of its letter (task ``arc_easy_text``).

Why a second format: SmolLM2-135M-Instruct's option letters are at chance on ARC-Easy (23.7% of
the 1150 test questions) while ranking the option texts by log-likelihood picks the right one
51.0% of the time (``t2dist loglik``): the small model knows more than it can map to a letter,
and 60 steps of RL on letters moved the letter distribution (KL 2.1) without making it right
(26.6%).  Answering with the text asks the model for what it knows, in generation.

Same questions and the same hash splits as ``arc_easy`` (the records and their ids are shared);
the options are listed without letters.  The verifier reads which option the answer's first
line gives.  SmolLM2 answers in sentences ("The structure that controls ... is the cell
membrane."), so an option is scored by how much of it the line contains: the share of the
option's content words (SQuAD's normalisation: lower case, articles dropped; punctuation becomes a
space so "1.28" stays apart from "128"; a few function words ignored) found in the line.  The
option with the highest share, at least 0.5, is the answer.  When several options share it, the
answer is the one whose words include all of theirs ("the moon, the sun, and Earth" over "the
moon and Earth"; "helper T-cells" over "cells"); the same words in another order ("solid ->
liquid -> gas" against "solid -> gas -> liquid") go by ``difflib``'s sequence ratio; anything else
is no answer (naming every option of an ordinary question earns nothing).  Reward +1 for the gold option, -1 otherwise.  Every gold option reads as itself.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from difflib import SequenceMatcher

from t2dist.tasks.base import Example, Verdict, register_task
from t2dist.tasks.benchmarks import ARCEasy

MIN_SHARE = 0.5
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans(string.punctuation, " " * len(string.punctuation))
_FUNCTION = frozenset("it is are was were be of to in on at for by with and or as that this which its".split())


def normalise(text: str) -> list[str]:
    """SQuAD's answer normalisation, as tokens: lower case, punctuation to spaces, no articles."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def _content(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t not in _FUNCTION] or tokens


def share_contained(line: list[str], option: list[str]) -> float:
    """The share of ``option``'s content words (with multiplicity) that ``line`` contains."""
    want = Counter(_content(option))
    return sum((want & Counter(line)).values()) / max(1, sum(want.values()))


def read_option(completion: str, options: list[str]) -> int | None:
    """Index of the option ``completion`` answers with, or None (nothing close enough, or a tie)."""
    line = next((ln for ln in completion.strip().splitlines() if ln.strip()), "") if isinstance(completion, str) else ""
    pred = normalise(line)
    if not pred:
        return None
    opts = [normalise(o) for o in options]
    shares = [share_contained(pred, o) for o in opts]
    best = max(shares)
    tied = [i for i, s in enumerate(shares) if s == best]
    if best < MIN_SHARE:
        return None
    if len(tied) > 1:  # the line contains several options whole: the one that contains all the others
        bags = {i: Counter(_content(opts[i])) for i in tied}
        top = [i for i in tied if all(not bags[j] - bags[i] for j in tied)]
        if len(top) > 1:  # the same words in another order: the closer order
            ratios = [SequenceMatcher(None, pred, opts[i]).ratio() for i in top]
            top = [top[ratios.index(max(ratios))]] if ratios.count(max(ratios)) == 1 else []
        return top[0] if top else None
    return tied[0]


@register_task("arc_easy_text")
class ARCEasyText(ARCEasy):
    records_of = "arc_easy"  # the same questions in the same splits
    max_new_tokens = 24
    INSTRUCTION = "Answer with the text of the correct option only."

    def to_example(self, rec: dict) -> Example:
        opts = "\n".join(f"- {o}" for o in rec["options"])
        prompt = f"Question: {rec['question']}\nOptions:\n{opts}\n\n{self.INSTRUCTION}"
        meta = {"options": rec["options"], "question": rec["question"], "gold": rec["gold"]}
        return Example(self.name, prompt, rec["options"][rec["gold"]], meta)

    def plain_prompt(self, example: Example) -> str:
        opts = "\n".join(f"- {o}" for o in example.meta["options"])
        return f"Question: {example.meta['question']}\nOptions:\n{opts}\nAnswer:"

    def verify(self, completion: str, example: Example) -> Verdict:
        completion = completion.split("\nQuestion:", 1)[0] if isinstance(completion, str) else ""
        options = example.meta["options"]
        i = read_option(completion, options)
        if i is None:
            return Verdict(-1.0, False, None, "no single option matches the answer")
        ok = i == example.meta["gold"]
        return Verdict(1.0 if ok else -1.0, ok, options[i], "")

    def reference_completion(self, example: Example) -> str:
        return example.answer


@register_task("arc_easy_open")
class ARCEasyOpen(ARCEasyText):
    """ARC-Easy closed-book: the question alone, no options shown; the answer is read as in
    ``arc_easy_text`` (the option whose content words the first line holds).  This asks for what
    the log-likelihood reference measures, the option the model itself would say, without the
    listed options that SmolLM2 copies by position (it names a listed option 23% right)."""

    INSTRUCTION = "Answer in a few words."
    multiple_choice = False  # no options in the prompt: nothing to reorder

    def to_example(self, rec: dict) -> Example:
        meta = {"options": rec["options"], "question": rec["question"], "gold": rec["gold"]}
        return Example(self.name, f"Question: {rec['question']}\n\n{self.INSTRUCTION}", rec["options"][rec["gold"]], meta)

    def plain_prompt(self, example: Example) -> str:
        return f"Question: {example.meta['question']}\nAnswer:"
