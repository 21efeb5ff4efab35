"""Deterministic prompt order for RL: an epoch-wise shuffled stream with a resumable position."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from t2dist.tasks.base import Example, Task


class PromptStream:
    """Yields batches of training examples; the order depends only on ``seed`` and ``position``.

    ``position`` counts examples handed out so far, so saving it in a checkpoint and
    passing it back reproduces the rest of the stream exactly.
    """

    def __init__(self, examples: Sequence[Example], seed: int, position: int = 0,
                 arrange: Callable[[list[Example]], list[Example]] | None = None):
        if not examples:
            raise ValueError("the training split is empty: nothing to train on")
        self.examples = list(examples)
        self.seed = seed
        self.position = position
        self.arrange = arrange  # a deterministic rewrite of each batch (e.g. balance_answers)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self, size: int) -> list[Example]:
        out = []
        n = len(self.examples)
        while len(out) < size:
            epoch, offset = divmod(self.position, n)
            order = self._order(epoch)
            take = min(size - len(out), n - offset)
            out.extend(self.examples[i] for i in order[offset: offset + take])
            self.position += take
        return self.arrange(out) if self.arrange else out


def balance_answers(task: Task, batch: list[Example]) -> list[Example]:
    """``batch`` with each multiple-choice question's options rotated so that the right answers of the
    batch cycle through the letters: the i-th prompt's answer is option ``i mod n`` (A, B, C, D, A, ...
    for four options).

    Why: with one-token letter answers, a batch whose right answers are mostly "B" pushes every
    prompt toward "B", and Adam turns that batch-to-batch noise into a drift of the letter prior (SmolLM2
    and Gemma on ARC-Easy collapse onto one letter).  With every letter right equally often in a batch,
    the gradient of a prompt-independent letter bias sums to zero (sum over c of p(c)(e_c - p) = 0); what
    is left rewards picking the right option *text*.  Only the training prompts are rotated; evaluation
    keeps the data set's order.
    """
    return [task.with_answer_at(example, i) for i, example in enumerate(batch)]


def training_stream(task: Task, option_order: str, seed: int, position: int = 0) -> PromptStream:
    """The RL prompt stream of ``task``'s train split (``task.option_order``: ``given`` or ``balanced``);
    the one constructor of ``train-local`` and ``t2dist train``."""
    arrange = (lambda batch: balance_answers(task, batch)) if option_order == "balanced" else None
    return PromptStream(task.examples("train"), seed, position=position, arrange=arrange)
