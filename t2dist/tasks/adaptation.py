"""Tasks of the two-pass self-adaptation stage: ``caps`` (the "other" family),
``dispatch`` (first pass: name the kind of a prompt) and ``mixed`` (second pass test set).

``caps`` (skill ``other``): ``Q: caps qkz\\nA:`` -> `` QKZ`` — a task no expert is
trained for; the toy base answers it, and the two-pass procedure must send it to the
base model.  No trap subset.

``dispatch`` (skill ``dispatch``): the prompt of a ``math``, ``code``, ``reasoning`` or
``caps`` example wrapped in the dispatch template
(:data:`t2dist.adapt.dispatch.DEFAULT_TEMPLATE`); the answer is its category
(``math``/``code``/``reasoning``/``other``).  Split ``s`` of ``dispatch`` is built from
split ``s`` of the four source tasks, so it is prompt-disjoint across splits like they
are.  Trap subset (where the pretraining corpus gives a systematic wrong category 65% of
the time, so the base is a mediocre classifier that RL can fix), chosen independently
of the source tasks' own traps: math prompts whose first number starts with 1 or 2
(labelled ``code``), code prompts whose first step is ``mul`` (labelled ``math``),
reasoning prompts whose first option starts with 1 or 2 (labelled ``math``), caps
prompts whose word starts with a-e (labelled ``code``): ~25% of prompts.

``mixed``: math, code and reasoning examples of one split interleaved (test: 3 x 400),
each verified by its originating task's verifier (``example.task`` names it).
"""
from __future__ import annotations

import random
import string
from functools import cached_property
from typing import Sequence

from t2dist.adapt.dispatch import DEFAULT_TEMPLATE, check_template, parse_label
from t2dist.tasks.base import Example, Task, Verdict, check_split, get_task, register_task
from t2dist.tasks.synthetic import SyntheticTask

# Source task -> dispatch category.
SOURCES: dict[str, str] = {"math": "math", "code": "code", "reasoning": "reasoning", "caps": "other"}
OTHER_CATEGORY = "other"
MIXED_SOURCES: tuple[str, ...] = ("math", "code", "reasoning")


@register_task("caps")
class CapsTask(SyntheticTask):
    """Write a 3-5 letter lower-case word in capitals (the "other" family; no expert)."""

    skill = "other"
    max_new_tokens = 7
    trap_fraction = 0.0

    def sample(self, rng, trap):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        ans = word.upper()
        return f"Q: caps {word}\nA:", ans, {"trap_answer": ans, "completion": f" {ans}\n"}

    def verify(self, completion: str, example: Example) -> Verdict:
        got = (completion or "").split("\n", 1)[0].strip()
        ok = got == example.answer
        return Verdict(1.0 if ok else -1.0, ok, got or None)


def dispatch_trap(example: Example) -> str | None:
    """The systematic wrong category of a dispatch trap prompt, or None (see module doc)."""
    p = example.prompt
    if example.task == "math":
        return "code" if p[len("Q: ")] in "12" else None
    if example.task == "code":
        return "math" if p.startswith("Q: mul") else None
    if example.task == "reasoning":
        return "math" if example.meta["options"][0][0] in "12" else None
    if example.task == "caps":
        return "code" if p[len("Q: caps ")] in "abcde" else None
    return None


@register_task("dispatch")
class DispatchTask(Task):
    """Name the kind of a prompt: math, code, reasoning or other (the first pass)."""

    skill = "dispatch"
    max_new_tokens = 10
    chat = "never"  # raw text, the format the toy base was pretrained on
    sources: dict[str, str] = SOURCES  # source task -> its category
    answer_prefix = ""  # written after the question (and the chat template's assistant header) for the model

    def prompt_for(self, example: Example, tokenizer=None) -> str:
        return super().prompt_for(example, tokenizer) + self.answer_prefix

    def __init__(self, template: str | None = None):
        self.template = check_template(template or self.default_template() or DEFAULT_TEMPLATE)

    @staticmethod
    def default_template() -> str | None:
        return None  # the toy one (DEFAULT_TEMPLATE)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.sources.values(), OTHER_CATEGORY]))

    def wrap(self, src: Example) -> Example:
        cat = self.sources[src.task]
        trap = dispatch_trap(src)
        text = get_task(src.task).format_prompt(src)  # the user's text, before any chat template
        meta = {"trap": trap is not None, "trap_answer": trap or cat, "source_task": src.task,
                "source_prompt": text, "completion": f" {cat}\n"}
        return Example(self.name, self.template.format(prompt=text), cat, meta)

    @cached_property
    def _splits(self) -> dict[str, list[Example]]:
        out = {}
        for split in ("train", "validation", "test"):
            exs = [self.wrap(e) for name in self.sources for e in get_task(name).examples(split)]
            random.Random(f"{self.name}/{split}").shuffle(exs)
            out[split] = exs
        return out

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def heldout_prompts(self) -> set[str]:
        return {e.prompt for s in ("validation", "test") for e in self._splits[s]}

    def corpus_examples(self, n: int, seed: int, trap_fraction: float | None = None) -> list[Example]:
        """``n`` dispatch examples over the source tasks' corpus problems (never held-out prompts).

        ``trap_fraction`` is ignored: the dispatch trap subset is a property of the prompt.
        """
        per = -(-n // len(SOURCES))
        exs = [self.wrap(e) for name in SOURCES for e in get_task(name).corpus_examples(per, seed=seed)]
        random.Random(f"dispatch/corpus/{seed}").shuffle(exs)
        return exs[:n]

    def verify(self, completion: str, example: Example) -> Verdict:
        got = parse_label(completion, self.categories)
        ok = got == example.answer
        return Verdict(1.0 if ok else -1.0, ok, got)


@register_task("mixed")
class MixedTask(Task):
    """math, code and reasoning examples interleaved; each checked by its own task's verifier."""

    skill = "mixed"
    max_new_tokens = 12
    chat = "never"  # the synthetic suite's raw "Q: ...\nA:" text
    sources: tuple[str, ...] = MIXED_SOURCES

    @cached_property
    def _splits(self) -> dict[str, list[Example]]:
        out = {}
        for split in ("train", "validation", "test"):
            per = [get_task(n).examples(split) for n in self.sources]
            out[split] = [ex for group in zip(*per) for ex in group]  # round-robin, shortest length
        return out

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def verify(self, completion: str, example: Example) -> Verdict:
        return self.verify_batch([completion], [example])[0]

    def verify_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Verdict]:
        completions, examples = list(completions), list(examples)
        if len(completions) != len(examples):
            raise ValueError("completions and examples differ in length")
        out: list[Verdict | None] = [None] * len(examples)
        for name in dict.fromkeys(e.task for e in examples):
            idx = [i for i, e in enumerate(examples) if e.task == name]
            vs = get_task(name).verify_batch([completions[i] for i in idx], [examples[i] for i in idx])
            for i, v in zip(idx, vs):
                out[i] = v
        return out  # type: ignore[return-value]


ADAPTATION_TASKS = ("caps", "dispatch", "mixed")
