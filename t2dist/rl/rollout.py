"""One rollout: sample completions for a group of prompts and score them.

Shared by ``train-local`` and the distributed rollout actors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from t2dist.generation import generate
from t2dist.tasks.base import Example, Task


@dataclass
class RolloutBatch:
    """Samples of ``P`` prompts × ``N`` completions, flattened prompt-major."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: torch.Tensor  # (P, N)
    correct: torch.Tensor  # (P, N) bool
    texts: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def samples_per_prompt(self) -> int:
        return self.rewards.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completion_ids])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def select(self, prompt_rows: Sequence[int]) -> "RolloutBatch":
        """The sub-batch of the given prompt groups (used to split a batch across ranks)."""
        n = self.samples_per_prompt
        flat = [r * n + j for r in prompt_rows for j in range(n)]
        return RolloutBatch(
            [self.prompt_ids[i] for i in flat],
            [self.completion_ids[i] for i in flat],
            self.rewards[list(prompt_rows)],
            self.correct[list(prompt_rows)],
            [self.texts[i] for i in flat] if self.texts else [],
        )

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """One batch from parts made in parallel; ``seconds`` keeps the slowest part's times."""
        keys = {k for b in batches for k in b.seconds}
        return RolloutBatch(
            [p for b in batches for p in b.prompt_ids],
            [c for b in batches for c in b.completion_ids],
            torch.cat([b.rewards for b in batches]),
            torch.cat([b.correct for b in batches]),
            [t for b in batches for t in b.texts],
            {k: max(b.seconds.get(k, 0.0) for b in batches) for k in keys},
        )


def rollout(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    samples_per_prompt: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    batch_size: int = 128,
) -> RolloutBatch:
    """Sample ``samples_per_prompt`` completions per example from ``model`` and verify them."""
    import time

    t0 = time.perf_counter()
    prompts = [task.prompt_for(e, tokenizer) for e in examples]
    completions = generate(
        model, tokenizer, prompts,
        num_samples=samples_per_prompt, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens or task.max_new_tokens, stop=task.stop,
        batch_size=batch_size, seed=seed,
    )
    t1 = time.perf_counter()
    verdicts = task.verify_batch([c.text for c in completions], [examples[c.prompt_index] for c in completions])
    t2 = time.perf_counter()
    shape = (len(examples), samples_per_prompt)
    return RolloutBatch(
        prompt_ids=[list(c.prompt_ids) for c in completions],
        completion_ids=[list(c.completion_ids) for c in completions],
        rewards=torch.tensor([v.reward for v in verdicts], dtype=torch.float32).view(shape),
        correct=torch.tensor([v.correct for v in verdicts]).view(shape),
        texts=[c.text for c in completions],
        seconds={"generate": t1 - t0, "score": t2 - t1},
    )
