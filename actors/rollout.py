"""The rollout actor: holds a rollout engine (base model + factors), sets z, samples and scores.

A plain class; the driver turns it into a Ray actor with the resources from the config
(``ray.remote(num_cpus=..., num_gpus=...)(RolloutWorker)``).  The same class serves as
the evaluator: it evaluates any z greedily on a split.  It talks to its engine only through
:class:`t2dist.engines.base.RolloutEngine` (``rollout.engine``; the evaluator's ``eval.engine``,
default the same): ``set_z``, ``unset_z``, ``generate``.  When the engine's own process dies
(:class:`~t2dist.engines.base.EngineDied`), the actor exits so that Ray restarts it and the
driver redoes its share of the step, as for any actor death.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Mapping

import torch

from t2dist.config import Config, config_from_dict
from t2dist.engines import make_engine
from t2dist.engines.base import EngineDied, z_nbytes
from t2dist.evaluation.accuracy import evaluate
from t2dist.experts.expert import make_card
from t2dist.rl.rollout import RolloutBatch, engine_rollout
from t2dist.tasks import get_task
from t2dist.verifiers.sandbox import SandboxLimits, configure_default_pool

__all__ = ["RolloutWorker", "z_nbytes"]


def _exit_on_engine_death(fn):
    """Turn the engine process's death into this actor's (Ray restarts it; the driver redoes the work)."""
    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except EngineDied as exc:
            print(f"[t2dist] {self.role} {self.index}: {exc}; exiting so that Ray restarts this actor", flush=True)
            os._exit(70)
    return wrapped


class RolloutWorker:
    role = "rollout"  # the evaluator subclass uses eval.engine
    def __init__(self, cfg: Config | dict, index: int = 0, threads: int | None = None):
        cfg = cfg if isinstance(cfg, Config) else config_from_dict(cfg)
        torch.set_num_threads(threads or cfg.rollout.threads_per_actor)
        self.cfg = cfg
        self.index = index
        sb = cfg.sandbox
        configure_default_pool(
            SandboxLimits(memory_mb=sb.memory_mb, cpu_seconds=sb.cpu_seconds, wall_seconds=sb.wall_seconds,
                          max_processes=sb.max_processes),
            workers=sb.workers or max(1, int(cfg.rollout.cpus_per_actor)),
            allow_rlimits_only=sb.allow_rlimits_only,
            seccomp=sb.seccomp,
        )
        name, batch_size = self.engine_choice(cfg)
        self.engine = make_engine(cfg, name, batch_size=batch_size)
        self.policy, self.tokenizer = self.engine.policy, self.engine.tokenizer  # the policy: card, check_compatible
        self.task = get_task(cfg.task.name)

    def engine_choice(self, cfg: Config) -> tuple[str, int]:
        """The engine's name and batch size for this actor's role (the evaluator: ``eval.engine``)."""
        if self.role == "evaluator":
            return cfg.eval.engine or cfg.rollout.engine, cfg.eval.batch_size
        return cfg.rollout.engine, cfg.rollout.batch_size

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "fingerprint": self.policy.fingerprint,
                "num_z": self.policy.num_z, **self.engine.info()}

    @_exit_on_engine_death
    def set_expert(self, z: Mapping[str, torch.Tensor], version: object) -> int:
        """Make W'(z) the engine's weights (skipped when this version is already set); returns z's bytes."""
        return self.engine.set_z(z, version)

    @_exit_on_engine_death
    def rollout(self, examples, seed: int) -> RolloutBatch:
        rl = self.cfg.rl
        return engine_rollout(self.engine, self.task, examples, samples_per_prompt=rl.samples_per_prompt,
                              temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=self.cfg.task.max_new_tokens,
                              seed=seed)

    @_exit_on_engine_death
    def evaluate(self, z: Mapping[str, torch.Tensor] | None, split: str, limit: int | None = None,
                 version: object = None) -> dict:
        """Greedy accuracy of ``z`` (None: the base model) on ``split``."""
        t0 = time.perf_counter()
        if z is None:
            self.engine.unset_z()
        else:
            self.engine.set_z(z, version)
        res = evaluate(self.engine, self.task, split=split, limit=limit, max_new_tokens=self.cfg.task.max_new_tokens)
        return {**res.as_dict(), "seconds": time.perf_counter() - t0, "version": version}

    def card(self, name: str, metrics: dict, config: dict, extra: dict | None = None) -> dict:
        """An expert card for this actor's base model and SVF setup."""
        return make_card(self.policy, name=name, task=self.task.name, metrics=metrics, config=config,
                         base_model=self.cfg.model.path, **(extra or {}))
