"""The loss of one RL update on a rollout batch: shared by ``train-local`` and the learner."""
from __future__ import annotations

from typing import Mapping

import torch

from t2dist.config import RLConfig
from t2dist.rl.logprobs import completion_logprobs, output_head
from t2dist.rl.losses import aggregate, compute_advantages, policy_loss
from t2dist.rl.rollout import RolloutBatch
from t2dist.policy.base import Policy


def kl_wanted(cfg: RLConfig, step: int) -> bool:
    """Whether the update of 1-based ``step`` computes the KL to the neutral model: always when it is
    in the loss (``beta > 0``), else every ``kl_every`` steps, for the log only."""
    return cfg.beta > 0 or (cfg.kl_every > 0 and step % cfg.kl_every == 0)


def rl_loss(
    policy: Policy,
    z: Mapping[str, torch.Tensor],
    batch: RolloutBatch,
    cfg: RLConfig,
    *,
    pad_id: int,
    advantages: torch.Tensor | None = None,
    normalizer: float | None = None,
    with_kl: bool = True,
    old_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss of ``z`` on ``batch`` with the KL to the neutral model.

    With ``cfg.shared_prefix`` each distinct prompt of the batch runs once and its samples' completions
    run on its KV cache (:func:`t2dist.rl.logprobs.shared_prefix_logits`; the same numbers as the
    packed forward, ~2.8x fewer token positions on SmolLM2 arith); ``policy.bind`` builds what depends on
    ``z`` once for both of its passes.
    The reference log-probs come from the same model at neutral ``z`` (no second copy); that
    forward is skipped when ``with_kl`` is false and ``cfg.beta`` is 0 (``stats`` has no ``kl`` then).
    ``advantages`` may be passed in when the batch is a shard of a larger one whose
    groups were already normalised; ``normalizer`` is the global token/sequence count.
    ``old_logp`` (from :func:`behaviour_logprobs`) turns on PPO's clipped ratio with
    ``cfg.clip_eps``, for the second and later updates on one batch.
    """
    if advantages is None:
        advantages = compute_advantages(batch.rewards, cfg.advantage)
    adv = advantages.reshape(-1)
    device = next(policy.model.parameters()).device  # every policy kind keeps its tensors with the model
    share, head = cfg.shared_prefix, output_head(policy.model)  # the head only where a completion token is
    logp, mask, entropy = completion_logprobs(
        policy.bind(z), batch.prompt_ids, batch.completion_ids, pad_id, device, with_entropy=True, share_prefix=share,
        head=head,
    )
    ref_logp = None
    if with_kl or cfg.beta > 0:
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(policy.bind(policy.neutral_z()), batch.prompt_ids, batch.completion_ids,
                                              pad_id, device, share_prefix=share, head=head)
    loss, stats = policy_loss(
        logp, mask, adv.to(device), ref_logp=ref_logp, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
        agg=cfg.loss_agg, normalizer=normalizer, old_logp=old_logp,
        clip_eps=cfg.clip_eps if old_logp is not None else None,
        behaviour_logp=batch.behaviour_tensor(device),  # engine log-probs: mismatch stats (and TIS)
        tis_cap=cfg.tis_cap if cfg.behaviour_correction == "tis" else None,
    )
    stats["entropy"] = aggregate(entropy.detach(), mask.to(entropy.dtype), cfg.loss_agg, normalizer)
    return loss, {k: float(v) for k, v in stats.items()}


@torch.no_grad()
def behaviour_logprobs(policy: Policy, z: Mapping[str, torch.Tensor], batch: RolloutBatch, *, pad_id: int,
                       share_prefix: bool = False) -> torch.Tensor:
    """Per-token log-probs of the batch under ``z`` before any update (PPO's ``old_logp``)."""
    device = next(policy.model.parameters()).device  # every policy kind keeps its tensors with the model
    logp, _ = completion_logprobs(policy.bind(z), batch.prompt_ids, batch.completion_ids, pad_id, device,
                                  share_prefix=share_prefix, head=output_head(policy.model))
    return logp
