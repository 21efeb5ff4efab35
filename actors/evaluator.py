"""The evaluator actor: greedy held-out accuracy of any z, and publishing to the registry.

It is a rollout worker (same base model, factors and task) that is never asked to sample.
During training the driver sends it z every ``train.eval_every`` steps and collects the
validation accuracy in the background (``ray.wait``), so the training loop never blocks on
it.  At the end it publishes the best z with its metrics, run config, base fingerprint and
training-curve summary, and moves the alias (``champion``) only when the new expert beats
the current champion *on the same validation set*: the champion is re-scored here, with
this run's split and limit, rather than trusting a number measured by another run.  The rule
and its compare-and-set on the alias live in :mod:`t2dist.registry.champion`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from actors.rollout import RolloutWorker
from t2dist.experts.expert import ExpertError, check_compatible
from t2dist.registry import Registry, RegistryError
from t2dist.registry.champion import NotComparable, promote_if_better


class EvaluatorWorker(RolloutWorker):
    role = "evaluator"  # its engine: eval.engine (default rollout.engine), batches of eval.batch_size

    def publish(self, z: Mapping[str, torch.Tensor], card: Mapping[str, Any], *, url: str,
                storage_options: Mapping[str, Any] | None = None, name: str | None = None,
                alias: str | None = "champion", val_accuracy: float, val_limit: int | None) -> dict:
        """Publish ``z`` as a new version; maybe move ``alias`` (the race-free rule of
        :func:`t2dist.registry.champion.promote_if_better`).  Returns what happened."""
        reg = Registry(url, storage_options, create=True)
        name = name or card["name"]
        ref = reg.publish(z, card, name=name)
        version = int(ref.rsplit("@", 1)[1])
        out: dict[str, Any] = {"ref": ref, "registry": url, "alias": alias, "promoted": False}
        if not alias:
            return out

        def score_of(current: int) -> tuple[float, dict]:
            champion = reg.load(f"{name}@{current}")
            try:
                check_compatible(champion, self.policy, source=f"{name}@{current}")
            except ExpertError as exc:
                raise NotComparable(str(exc)) from None
            res = self.evaluate(champion.z, "validation", val_limit, version=("champion", name, current))
            return res["accuracy"], {"n": res["n"]}

        d = promote_if_better(reg, name, version, val_accuracy, score_of, alias=alias)
        out.update(promoted=d.promoted, reason=d.reason)
        if d.champion_score is not None:
            out["champion"] = {"ref": f"{name}@{d.champion}", "val_accuracy": d.champion_score, **d.details}
        return out


__all__ = ["EvaluatorWorker", "RegistryError"]
