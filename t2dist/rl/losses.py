"""Advantage estimators, KL estimators and the policy-gradient loss.

Both estimator families are small registries: adding one is one decorated function.
Rewards arrive as a ``(prompts, samples)`` matrix: each row is one prompt's group.
"""
from __future__ import annotations

from typing import Callable

import torch

ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def _register(registry: dict, kind: str, name: str):
    def wrap(fn):
        if name in registry:  # a silent overwrite would change every run's maths
            raise ValueError(f"{kind} {name!r} is registered twice ({registry[name].__module__}.{registry[name].__name__} "
                             f"and {fn.__module__}.{fn.__name__})")
        registry[name] = fn
        return fn
    return wrap


def register_advantage(name: str):
    """Function decorator: ``@register_advantage("rloo")``; a name registered before is an error."""
    return _register(ADVANTAGES, "advantage estimator", name)


def register_kl(name: str):
    """Function decorator: ``@register_kl("k3")``; a name registered before is an error."""
    return _register(KL_ESTIMATORS, "KL estimator", name)


@register_advantage("group_mean")
def group_mean(rewards: torch.Tensor) -> torch.Tensor:
    """Reward minus the mean reward of its prompt's group (the paper's REINFORCE baseline)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: reward minus the mean of the *other* samples of the group."""
    n = rewards.shape[1]
    if n < 2:
        raise ValueError("the rloo advantage needs rl.samples_per_prompt >= 2")
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantage of GRPO: (r − mean) / (std + eps)."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


@register_advantage("none")
def no_baseline(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.clone()


# Per-token estimators of KL(π‖π_ref) from samples of π (Schulman, "Approximating KL divergence").
@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def compute_advantages(rewards: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; known: {', '.join(ADVANTAGES)}")
    return ADVANTAGES[estimator](rewards)


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, normalizer: float | None = None) -> torch.Tensor:
    """Reduce per-token values ``(B, T)`` to a scalar.

    ``token_mean`` divides the masked sum by the number of tokens, ``seq_mean`` averages
    each sequence's token mean over sequences.  ``normalizer`` replaces the local token
    (or sequence) count with the *global* one, so that data-parallel ranks summing their
    gradients reproduce the single-process loss exactly.
    """
    if how == "token_mean":
        return (values * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    if how == "seq_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / (normalizer if normalizer is not None else per_seq.numel())
    raise ValueError(f"unknown loss aggregation {how!r}; expected token_mean or seq_mean")


def policy_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token_mean",
    clip_eps: float | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-regularised policy-gradient loss over sampled tokens.

    ``logp``/``old_logp``/``ref_logp`` are per-token log-probabilities ``(B, T)`` of the
    sampled tokens under the current, behaviour and reference (neutral-z) policies;
    ``advantages`` is one value per sequence ``(B,)``.  With ``old_logp`` omitted the
    ratio is ``exp(logp − logp.detach())`` = 1, whose gradient is REINFORCE's
    ``A ∇log π``; with ``clip_eps`` it is PPO's clipped surrogate.
    """
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    pg = -ratio * adv
    if clip_eps is not None:
        pg = torch.maximum(pg, -torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    per_token = pg
    stats: dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {kl_estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)
        stats["kl"] = aggregate(kl.detach(), mask, agg, normalizer)
        if beta:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, agg, normalizer)
    stats["pg_loss"] = aggregate(pg.detach(), mask, agg, normalizer)
    if clip_eps is not None:
        clipped = ((ratio - 1.0).abs() > clip_eps).to(logp.dtype)
        stats["clip_frac"] = aggregate(clipped, mask, agg, normalizer)
    return loss, stats
