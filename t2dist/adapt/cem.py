"""Few-shot cross-entropy-method search over expert mixing weights α.

A candidate is ``α`` of shape ``(K,)`` (one weight per expert) or ``(K, T)`` (per
expert and per target matrix); the mixed expert is ``z' = Σ_k α_k z_k``
(:func:`t2dist.svf.model.mix_z`).  Each iteration samples ``population`` candidates
from a diagonal Gaussian, scores them with a pluggable *evaluator* (a callable taking a
list of candidates and returning one score each: local, or farmed out to rollout actors
by :mod:`t2dist.orchestration.adapt`), and refits mean and spread to the ``elite_frac`` best.

Why seeding: on a tiny model the few-shot score is coarse and noisy; putting the single
experts (one-hot α) into the first population guarantees the search never returns
something that scored worse than the best single expert on the shots, and ties are
broken in favour of the earliest candidate (the single experts) — the prototype found
that without it, 10 shots chose an overfit mixture that lost to the best single expert.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from t2dist.config import CEMConfig

Evaluator = Callable[[Sequence[torch.Tensor]], Sequence[float]]


#: The search settings are the ``adapt.cem`` section of the run config: one class, so its fields and
#: defaults (50 shots: 10 overfit on the toy base) have one source.  ``CEMSettings(...)`` builds
#: one by hand (validated like the YAML: ``population >= 2``, ``0 < elite_frac <= 1``, ...).
CEMSettings = CEMConfig

MIN_STD = 1e-3  # the search also stops once the spread of every alpha has collapsed below this


def n_elite(s: CEMSettings) -> int:
    """Candidates the next distribution is fit to: ``ceil(elite_frac * population)``, at least 1."""
    return max(1, math.ceil(s.elite_frac * s.population))


@dataclass
class CEMResult:
    alpha: torch.Tensor
    score: float
    iterations: int
    evaluations: int
    seconds: float
    trace: list[dict] = field(default_factory=list)  # per iteration: best, mean score, elite mean, std

    def summary(self) -> dict:
        return {"alpha": self.alpha.tolist(), "score": self.score, "iterations": self.iterations,
                "evaluations": self.evaluations, "seconds": round(self.seconds, 2)}


def seed_candidates(num_experts: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The single experts as candidates: one-hot α (broadcast over matrices when per-matrix)."""
    out = []
    for k in range(num_experts):
        a = torch.zeros(shape)
        a[k] = 1.0
        out.append(a)
    return out


def cem_search(num_experts: int, evaluate: Evaluator, settings: CEMSettings | None = None,
               num_matrices: int | None = None, log: Callable[[str], None] | None = None) -> CEMResult:
    """Maximise ``evaluate`` over α; returns the best candidate ever scored and the trace."""
    s = settings or CEMSettings()
    if num_experts < 1:
        raise ValueError("CEM needs at least one expert")
    if s.per_matrix and not num_matrices:
        raise ValueError("per-matrix α needs num_matrices")
    shape = (num_experts, num_matrices) if s.per_matrix else (num_experts,)
    gen = torch.Generator().manual_seed(s.seed)
    mean = torch.full(shape, 1.0 / num_experts)
    std = torch.full(shape, float(s.init_std))
    best_alpha, best_score, since_best = None, -math.inf, 0
    trace: list[dict] = []
    t0 = time.perf_counter()
    evaluations = 0
    it = 0
    for it in range(1, s.iterations + 1):
        cands = [mean + std * torch.randn(shape, generator=gen) for _ in range(s.population)]
        if it == 1 and s.seed_experts:
            seeds = seed_candidates(num_experts, shape)[: s.population]
            cands = seeds + cands[len(seeds):]
        scores = [float(x) for x in evaluate(cands)]
        if len(scores) != len(cands):
            raise RuntimeError(f"evaluator returned {len(scores)} scores for {len(cands)} candidates")
        evaluations += len(cands)
        improved = False
        for c, sc in zip(cands, scores):  # strict >: ties keep the earlier (seeded) candidate
            if sc > best_score:
                best_alpha, best_score, improved = c.clone(), sc, True
        order = sorted(range(len(cands)), key=lambda i: -scores[i])  # stable: earlier first on ties
        elites = torch.stack([cands[i] for i in order[: n_elite(s)]])
        mean = elites.mean(0)
        std = elites.std(0, unbiased=False) if len(elites) > 1 else std * 0.5
        rec = {"iteration": it, "best": best_score, "mean": sum(scores) / len(scores),
               "elite_mean": sum(scores[i] for i in order[: n_elite(s)]) / n_elite(s),
               "std": float(std.mean()), "alpha_mean": [round(float(v), 4) for v in mean.reshape(num_experts, -1).mean(1)]}
        trace.append(rec)
        if log:
            log(f"cem {it}: best {best_score:.3f} pop-mean {rec['mean']:.3f} std {rec['std']:.3f}")
        since_best = 0 if improved else since_best + 1
        if since_best >= s.patience or float(std.max()) < MIN_STD:
            break
    return CEMResult(best_alpha, best_score, it, evaluations, time.perf_counter() - t0, trace)


def settings_dict(s: CEMSettings) -> dict:
    return s.model_dump()
