"""Deterministic prompt order for RL: an epoch-wise shuffled stream with a resumable position."""
from __future__ import annotations

from typing import Sequence

import torch

from t2dist.tasks.base import Example


class PromptStream:
    """Yields batches of training examples; the order depends only on ``seed`` and ``position``.

    ``position`` counts examples handed out so far, so saving it in a checkpoint and
    passing it back reproduces the rest of the stream exactly.
    """

    def __init__(self, examples: Sequence[Example], seed: int, position: int = 0):
        if not examples:
            raise ValueError("the training split is empty: nothing to train on")
        self.examples = list(examples)
        self.seed = seed
        self.position = position

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
        return out
