"""The toy base's pretraining corpus.

Documents are ``<s>`` + prompt + `` `` + label + ``\\n`` for problems of every task of
the synthetic suite (trained skills *and* unseen variants).  Problems come from
each task's TRAIN split plus extra problems of the same distribution drawn with a
separate seed; validation and test prompts are never used (checked).

Labels carry the traps: on a trap problem the label is the task's systematic
wrong answer (``meta["trap_answer"]``) with probability ``trap_wrong`` (0.65) and
the gold answer otherwise; on every other problem it is the gold answer.  A
label is drawn afresh each time a problem is used, so the model learns the
65/35 conditional distribution on the trap subset.

A share of the math and reasoning documents (``DRILL``) are written in another,
untrapped format (``Q: what is 347+3?``, ``Q: min of 16 51 61 82?``) and always
carry the correct answer: there the base learns the skill, which keeps the
correct answer in its sampling distribution on the trap prompts of the task's
own format.  Drill prompts never equal a task prompt.

Two families serve the self-adaptation stage (``t2dist.tasks.adaptation``): ``caps``
(``Q: caps qkz\nA: QKZ``, the "other" family that no expert covers; untrapped) and
``dispatch`` (a math/code/reasoning/caps prompt in the dispatch template, labelled with
its category; its trap subset, ~22% of prompts picked by a surface feature independent
of the source tasks' traps, carries a systematic wrong category 65% of the time, so the
base is a mediocre first-pass classifier that RL on ``dispatch`` can fix).

Batches are rows of ``seq_len`` (64) tokens packed with whole documents (first fit);
the training loss is on the label tokens only (`` label\\n``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from t2dist.tasks import get_task
from t2dist.tasks.base import Example

# Share of documents per task.
# ``caps`` is the "other" family and ``dispatch`` the first-pass classification
# (t2dist.tasks.adaptation): their trap subset makes the base a mediocre classifier.
DEFAULT_MIX: dict[str, float] = {
    "math": 0.36,
    "reasoning": 0.23,
    "code": 0.07,
    "math_mc": 0.12,
    "code3": 0.09,
    "caps": 0.04,
    "dispatch": 0.09,
}
TRAP_WRONG = 0.65
EXTRA_PER_TASK = 20_000
# Share of trap problems among the corpus's extra problems (the splits have 30%):
# more trap problems give the base enough examples of the correct (35%) answer.
CORPUS_TRAP_FRACTION = 0.5
# Share of a task's documents written as an untrapped "drill" in another format
# (always the correct answer): the base learns the skill there and keeps preferring
# the trap answer in the task's own format.
DRILL: dict[str, float] = {"math": 0.25, "reasoning": 0.3}


@dataclass
class CorpusConfig:
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    trap_wrong: float = TRAP_WRONG
    # per-task overrides of trap_wrong
    trap_wrong_by_task: dict[str, float] = field(default_factory=dict)
    trap_fraction: float = CORPUS_TRAP_FRACTION
    drill: dict[str, float] = field(default_factory=lambda: dict(DRILL))
    extra_per_task: int = EXTRA_PER_TASK
    # 64: a dispatch document (template + the longest prompt + " reasoning") is 60 tokens
    seq_len: int = 64
    batch_size: int = 96


def problem_pools(cfg: CorpusConfig, seed: int = 0) -> dict[str, list[Example]]:
    """Per task: train split + fresh problems; asserts none is a validation/test prompt."""
    pools = {}
    for name in cfg.mix:
        task = get_task(name)
        pool = task.examples("train") + task.corpus_examples(cfg.extra_per_task, seed=seed, trap_fraction=cfg.trap_fraction)
        held = task.heldout_prompts()
        leaked = [e.prompt for e in pool if e.prompt in held]
        if leaked:
            raise AssertionError(f"{name}: {len(leaked)} held-out prompts in the corpus, e.g. {leaked[0]!r}")
        pools[name] = pool
    return pools


def label(example: Example, rng: random.Random, trap_wrong: float) -> str:
    if example.meta.get("trap") and rng.random() < trap_wrong:
        return example.meta["trap_answer"]
    return example.answer


def document(example: Example, answer: str) -> tuple[str, str]:
    """(prompt part, label part) of one corpus document."""
    return example.prompt, f" {answer}\n"


def drill_document(example: Example) -> tuple[str, str] | None:
    """The problem in an untrapped drill format with its correct answer, or None.

    math: ``Q: what is 347+3?\\nA: 355``; reasoning: ``Q: min of 16 51 61 82?\\nA: 16``.
    """
    if example.task == "math":
        expr = example.prompt[len("Q: "):].split("=")[0]
        return f"Q: what is {expr}?\nA:", f" {example.answer}\n"
    if example.task == "reasoning":
        kind = example.prompt[len("Q: "):].split("?")[0]
        opts = example.meta["options"]
        value = opts["ABCD".index(example.answer)]
        return f"Q: {kind} of {' '.join(opts)}?\nA:", f" {value}\n"
    return None


class Corpus:
    """An endless, deterministic stream of packed training batches."""

    def __init__(self, tokenizer, cfg: CorpusConfig | None = None, seed: int = 0):
        self.cfg = cfg or CorpusConfig()
        self.tok = tokenizer
        self.rng = random.Random(f"corpus/{seed}")
        self.pools = problem_pools(self.cfg, seed)
        self.names = list(self.cfg.mix)
        self.weights = [self.cfg.mix[n] for n in self.names]
        vocab = tokenizer.get_vocab()
        self._char_id = {ch: i for ch, i in vocab.items() if len(ch) == 1}
        self._bos = tokenizer.bos_token_id
        self._pad = tokenizer.pad_token_id

    def _encode(self, text: str) -> list[int]:
        unk = self.tok.unk_token_id
        return [self._char_id.get(ch, unk) for ch in text]

    def sample_docs(self, n: int) -> Iterator[tuple[list[int], list[int]]]:
        for name in self.rng.choices(self.names, self.weights, k=n):
            ex = self.rng.choice(self.pools[name])
            drill = None
            if self.rng.random() < self.cfg.drill.get(name, 0.0):
                drill = drill_document(ex)
            wrong = self.cfg.trap_wrong_by_task.get(name, self.cfg.trap_wrong)
            prompt, lab = drill or document(ex, label(ex, self.rng, wrong))
            yield [self._bos] + self._encode(prompt), self._encode(lab)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) of shape [batch_size, seq_len]; labels -100 off-target."""
        B, L = self.cfg.batch_size, self.cfg.seq_len
        ids = torch.full((B, L), self._pad, dtype=torch.long)
        lab = torch.full((B, L), -100, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        fill = [0] * B
        open_rows = list(range(B))
        misses = 0
        while open_rows and misses < 4 * B:
            for p, a in self.sample_docs(1):
                n = len(p) + len(a)
                row = next((r for r in open_rows if fill[r] + n <= L), None)
                if row is None:
                    misses += 1
                    # close rows that cannot take even a short document
                    open_rows = [r for r in open_rows if L - fill[r] >= 20]
                    continue
                s = fill[row]
                ids[row, s : s + n] = torch.tensor(p + a)
                att[row, s : s + n] = 1
                lab[row, s + len(p) : s + n] = torch.tensor(a)
                fill[row] = s + n
        return ids, att, lab


def corpus_prompts(cfg: CorpusConfig | None = None, seed: int = 0) -> set[str]:
    """Every prompt the corpus may use (for disjointness checks)."""
    return {e.prompt for pool in problem_pools(cfg or CorpusConfig(), seed).values() for e in pool}


def sample_text(tokenizer, n: int = 5, seed: int = 0, cfg: CorpusConfig | None = None) -> Sequence[str]:
    c = Corpus(tokenizer, cfg, seed)
    return [tokenizer.decode(p + a) for p, a in c.sample_docs(n)]
