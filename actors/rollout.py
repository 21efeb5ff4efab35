"""The rollout actor: holds the base model and factors, recomposes W' from z, samples and scores.

A plain class; the driver turns it into a Ray actor with the resources from the config
(``ray.remote(num_cpus=..., num_gpus=...)(RolloutWorker)``).  The same class serves as
the evaluator: it evaluates any z greedily on a split.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

import torch

from t2dist.config import Config
from t2dist.evaluation import evaluate
from t2dist.experts import make_card
from t2dist.rl.rollout import RolloutBatch, rollout
from t2dist.runtime import load_svf
from t2dist.tasks import get_task
from t2dist.verifiers.sandbox import SandboxLimits, configure_default_pool


def z_nbytes(z: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in z.values())


class RolloutWorker:
    def __init__(self, cfg: Config | dict, index: int = 0, threads: int | None = None):
        cfg = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
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
        self.svf, self.tokenizer = load_svf(cfg)
        self.task = get_task(cfg.task.name)
        self.version: object = None

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "fingerprint": self.svf.fingerprint,
                "num_z": self.svf.num_z, "device": str(self.svf.model.device)}

    def set_expert(self, z: Mapping[str, torch.Tensor], version: object) -> int:
        """Recompose W'(z) in place (skipped when this version is already merged); returns z's bytes."""
        if version != self.version or version is None:
            self.svf.merge_(z, version)
            self.version = version
        return z_nbytes(z)

    def rollout(self, examples, seed: int) -> RolloutBatch:
        rl = self.cfg.rl
        batch = rollout(
            self.svf.model, self.tokenizer, self.task, examples,
            samples_per_prompt=rl.samples_per_prompt, temperature=rl.temperature, top_p=rl.top_p,
            max_new_tokens=self.cfg.task.max_new_tokens, seed=seed, batch_size=self.cfg.rollout.batch_size,
        )
        if torch.cuda.is_available():  # the KV caches are garbage now: give them back to a colocated learner rank
            torch.cuda.empty_cache()
        return batch

    def evaluate(self, z: Mapping[str, torch.Tensor] | None, split: str, limit: int | None = None,
                 version: object = None) -> dict:
        """Greedy accuracy of ``z`` (None: the base model) on ``split``."""
        t0 = time.perf_counter()
        if z is None:
            self.svf.unmerge_()
            self.version = None
        else:
            self.set_expert(z, version)
        res = evaluate(self.svf.model, self.tokenizer, self.task, split=split, limit=limit,
                       batch_size=self.cfg.eval.batch_size, max_new_tokens=self.cfg.task.max_new_tokens)
        return {**res.as_dict(), "seconds": time.perf_counter() - t0, "version": version}

    def card(self, name: str, metrics: dict, config: dict, extra: dict | None = None) -> dict:
        """An expert card for this actor's base model and SVF setup."""
        return make_card(self.svf, name=name, task=self.task.name, metrics=metrics, config=config,
                         base_model=self.cfg.model.path, **(extra or {}))
