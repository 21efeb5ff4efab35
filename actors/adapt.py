"""Rollout actors that score few-shot CEM candidates (mixing weights α) in parallel.

``AdaptWorker`` is a :class:`actors.rollout.RolloutWorker` (same model loading, same
resources) that also holds the experts' ``z`` vectors (kilobytes; sent once) and scores
candidate α with ``W'`` composed in its engine (``t2dist.adapt.strategies.score_alpha``;
the adaptation engine is ``eval.engine``, else ``rollout.engine``, with ``adapt.batch_size``).
The driver (``t2dist/orchestration/adapt.py``) splits each CEM population over N of them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from actors.rollout import RolloutWorker
from t2dist.adapt.strategies import score_alpha
from t2dist.tasks import get_task
from t2dist.tasks.base import Example


class AdaptWorker(RolloutWorker):
    role = "adapt"

    def engine_choice(self, cfg) -> tuple[str, int]:
        return cfg.eval.engine or cfg.rollout.engine, cfg.adapt.batch_size

    def set_experts(self, zs: Sequence[Mapping[str, torch.Tensor]]) -> int:
        """Keep the experts' z (in the driver's order); returns the number of experts."""
        for z in zs:
            self.policy.check_z(z)
        self.expert_zs = [{n: z[n] for n in self.policy.targets} for z in zs]  # one order for mix_z
        self.engine.unset_z()  # a mixture of the old experts must not pass for one of the new (same alpha key)
        return len(self.expert_zs)

    def score_mixture(self, alpha: torch.Tensor, task: str, examples: Sequence[Example]) -> float:
        """Greedy accuracy of ``mix_z(experts, alpha)`` on ``examples`` of ``task``."""
        return score_alpha(self.engine, self.expert_zs, alpha, get_task(task), examples)

    def score_mixtures(self, alphas: Sequence[torch.Tensor], task: str, examples: Sequence[Example]) -> list[float]:
        return [self.score_mixture(a, task, examples) for a in alphas]
