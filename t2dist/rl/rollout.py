"""One rollout: sample completions for a group of prompts and score them.

Shared by ``train-local`` and the distributed rollout actors: both sample through a
:class:`t2dist.engines.base.RolloutEngine` (:func:`engine_rollout`), so with the HF engine they give
the same samples for the same seed and ``rollout.batch_size``, and both record the behaviour
log-probs (the sampler's own log-probability of each sampled token), which the learner compares
with its own (``rl.behaviour_correction``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from t2dist.engines.generation import Completion
from t2dist.tasks.base import Example, Task
from t2dist.verifiers.audit import count_flagged


@dataclass
class RolloutBatch:
    """Samples of ``P`` prompts × ``N`` completions, flattened prompt-major."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: torch.Tensor  # (P, N)
    correct: torch.Tensor  # (P, N) bool
    texts: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # per sample, aligned with completion_ids: the sampler's log-prob of each token (None: not recorded)
    behaviour_logprobs: list[list[float]] | None = None
    # code tasks: passing completions whose program does more than define functions, by kind
    # (t2dist.verifiers.audit.count_flagged); empty where the verifier reads no programs
    audit: dict[str, int] = field(default_factory=dict)

    def integrity(self) -> dict[str, int]:
        """The step record's ``integrity_*`` counts (:attr:`audit` renamed; empty for tasks without programs)."""
        return {f"integrity_{k}": v for k, v in self.audit.items()}

    def behaviour_tensor(self, device=None) -> torch.Tensor | None:
        """``(B, T)`` right-padded behaviour log-probs (T = longest completion), or None."""
        if self.behaviour_logprobs is None:
            return None
        T = max((len(c) for c in self.completion_ids), default=0)
        out = torch.zeros((len(self.completion_ids), T), dtype=torch.float32)
        for i, lp in enumerate(self.behaviour_logprobs):
            out[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return out.to(device)

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
            behaviour_logprobs=None if self.behaviour_logprobs is None else [self.behaviour_logprobs[i] for i in flat],
        )

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """One batch from parts made in parallel; ``seconds`` keeps the slowest part's times."""
        keys = {k for b in batches for k in b.seconds}
        lps = None if any(b.behaviour_logprobs is None for b in batches) else \
            [lp for b in batches for lp in b.behaviour_logprobs]
        return RolloutBatch(
            [p for b in batches for p in b.prompt_ids],
            [c for b in batches for c in b.completion_ids],
            torch.cat([b.rewards for b in batches]),
            torch.cat([b.correct for b in batches]),
            [t for b in batches for t in b.texts],
            {k: max(b.seconds.get(k, 0.0) for b in batches) for k in keys},
            behaviour_logprobs=lps,
            audit={k: sum(b.audit.get(k, 0) for b in batches) for k in dict.fromkeys(k for b in batches for k in b.audit)},
        )


Sampler = Callable[..., list[Completion]]  # (prompts, n=, temperature=, top_p=, max_new_tokens=, stop=, seed=)


def sampled_rollout(sample: Sampler, tokenizer, task: Task, examples: Sequence[Example], *, samples_per_prompt: int,
                    temperature: float, top_p: float = 1.0, max_new_tokens: int | None = None,
                    seed: int | None = None) -> RolloutBatch:
    """Sample with ``sample`` (an engine's ``generate``), verify, and pack the batch."""
    t0 = time.perf_counter()
    prompts = [task.prompt_for(e, tokenizer) for e in examples]
    completions = sample(prompts, n=samples_per_prompt, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens or task.max_new_tokens, stop=task.stop, seed=seed)
    t1 = time.perf_counter()
    verdicts = task.verify_batch([c.text for c in completions], [examples[c.prompt_index] for c in completions])
    t2 = time.perf_counter()
    shape = (len(examples), samples_per_prompt)
    lps = [c.logprobs for c in completions]
    return RolloutBatch(
        prompt_ids=[list(c.prompt_ids) for c in completions],
        completion_ids=[list(c.completion_ids) for c in completions],
        rewards=torch.tensor([v.reward for v in verdicts], dtype=torch.float32).view(shape),
        correct=torch.tensor([v.correct for v in verdicts]).view(shape),
        texts=[c.text for c in completions],
        seconds={"generate": t1 - t0, "score": t2 - t1},
        behaviour_logprobs=None if any(lp is None for lp in lps) else [list(lp) for lp in lps],
        audit=count_flagged(verdicts) if any(v.flags is not None for v in verdicts) else {},
    )


def engine_rollout(engine, task: Task, examples: Sequence[Example], **kw) -> RolloutBatch:
    """:func:`sampled_rollout` through a :class:`t2dist.engines.base.RolloutEngine` (z already set)."""
    return sampled_rollout(engine.generate, engine.tokenizer, task, examples, **kw)

