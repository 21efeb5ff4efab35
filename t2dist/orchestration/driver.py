"""The Ray side of ``t2dist train``: connecting to a cluster, and the ``Driver`` that owns the actors.

``Driver`` starts the rollout actors, the evaluator and the DeepSpeed learner ranks (placed by
``actors/placement.py``), and offers the loop (``t2dist/orchestration/train.py``) one call per thing a step
does: ``sync`` z to the actors, ``rollout`` (a dead actor is restarted and its share redone,
up to ``train.max_actor_restarts`` times), ``learn``, ``get_z``, and saving/restoring the
learner ranks' state for a checkpoint. Only z (kilobytes) crosses process boundaries.

``ray.address`` follows Ray's convention: unset means ``$RAY_ADDRESS`` when set (``ray job
submit`` sets it for the job's driver), otherwise a local cluster of the run's own; ``auto``
(join a cluster running on this machine, or start one) and ``local`` stay available.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import ray
import torch

from actors.evaluator import EvaluatorWorker
from actors.placement import make_placement
from actors.rollout import RolloutWorker
from learner.group import global_normalizer, split_batch
from learner.worker import LearnerWorker
from t2dist.config import Config, dump_config
from t2dist.errors import TrainingError
from t2dist.rl.local import step_seed
from t2dist.rl.rollout import RolloutBatch

ACTOR_SEED_STRIDE = 7919  # actor i samples with step_seed + i * stride (actor 0 == train-local)


def resources_needed(cfg: Config) -> dict[str, float]:
    return {
        "CPU": cfg.rollout.actors * cfg.rollout.cpus_per_actor + cfg.learner.ranks * cfg.learner.cpus_per_rank
        + cfg.train.evaluator_cpus,
        "GPU": cfg.rollout.actors * cfg.rollout.gpus_per_actor + cfg.learner.ranks * cfg.learner.gpus_per_rank
        + cfg.train.evaluator_gpus,
    }


def ray_address(cfg: Config) -> str:
    """Ray's convention: ``ray.address`` when set, else ``$RAY_ADDRESS`` (``ray job submit`` sets it), else local."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"


def connect_ray(cfg: Config, need: dict[str, float] | None = None,
                error: Callable[[str], Exception] = TrainingError) -> str:
    """Join the cluster ``ray_address`` names (``ray job submit``, ``ray start``) or start a local one sized for
    ``need`` (default: the training run's :func:`resources_needed`); ``error`` builds what an unreachable
    cluster raises (the server's is an HTTP-shaped error).  Returns ``existing``, ``cluster`` or ``local``."""
    if ray.is_initialized():
        return "existing"
    address = ray_address(cfg)
    if address != "local":
        try:
            ray.init(address=address, log_to_driver=True)
            return "cluster"
        except ConnectionError:
            if address != "auto":
                key = "ray.address" if cfg.ray.address else "$RAY_ADDRESS"
                raise error(f"cannot reach the Ray cluster at {key}={address!r}") from None
    need = need or resources_needed(cfg)
    num_cpus = cfg.ray.num_cpus or max(int(need["CPU"] + 0.999), os.cpu_count() or 1)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=int(need["GPU"] + 0.999) if need["GPU"] else None,
             include_dashboard=False, log_to_driver=True)
    return "local"


def check_resources(cfg: Config) -> None:
    need = resources_needed(cfg)
    have = ray.cluster_resources()
    for kind, amount in need.items():
        if amount > have.get(kind, 0.0) + 1e-9:
            raise TrainingError(
                f"the run needs {amount:g} {kind}s (rollout.actors × rollout.{kind.lower()}s_per_actor + "
                f"learner.ranks × learner.{kind.lower()}s_per_rank + train.evaluator_{kind.lower()}s) "
                f"but the Ray cluster has {have.get(kind, 0.0):g}"
            )



def wait_all(refs: list, names: list[str], t0: float, every_s: float = 30.0) -> list:
    """``ray.get(refs)`` saying which finished as they do (``ready 3/5: evaluator (14s)``: seconds since ``t0``),
    and every ``every_s`` seconds which are still loading; the first failure raises, as ``ray.get`` does."""
    index = {ref: i for i, ref in enumerate(refs)}
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=every_s)
        for ref in ready:
            ray.get(ref)  # an actor that failed to start raises here
            done += 1
            print(f"[t2dist] ready {done}/{len(refs)}: {names[index[ref]]} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if not ready:
            print(f"[t2dist] still loading after {time.perf_counter() - t0:.0f}s: "
                  f"{', '.join(names[index[r]] for r in pending)}", flush=True)
    return ray.get(refs)


@dataclass
class PendingRollout:
    """A rollout in flight on the actors: what a restarted actor needs to redo its share."""

    z_ref: ray.ObjectRef
    version: int
    chunks: list
    seeds: list[int]
    refs: list[ray.ObjectRef]


class Driver:
    """The run's actors: rollout actors, the evaluator, the learner ranks; one method per thing a step does."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        cfg_dict = dump_config(cfg)
        self.tag = f"{os.getpid()}-{int(time.time() * 1000) % 10**8}"  # actor names: t2dist-<role>-<i>-<tag>
        self.placement = make_placement(cfg)  # ray.placement: none | colocated | separate (actors/placement.py)
        place = self.placement.options
        actor_cls = ray.remote(RolloutWorker)
        self.actors = [actor_cls.options(
            name=f"t2dist-rollout-{i}-{self.tag}", num_cpus=cfg.rollout.cpus_per_actor,
            num_gpus=cfg.rollout.gpus_per_actor, max_restarts=cfg.train.max_actor_restarts, max_task_retries=0,
            **place("rollout", i),
        ).remote(cfg_dict, i) for i in range(cfg.rollout.actors)]
        self.evaluator = ray.remote(EvaluatorWorker).options(
            num_cpus=cfg.train.evaluator_cpus, num_gpus=cfg.train.evaluator_gpus,
            max_restarts=cfg.train.max_actor_restarts, max_task_retries=0,
            **place("evaluator"),
        ).remote(cfg_dict, -1)
        learner_cls = ray.remote(LearnerWorker)
        self.learners = [learner_cls.options(
            name=f"t2dist-learner-{r}-{self.tag}", num_cpus=cfg.learner.cpus_per_rank,
            num_gpus=cfg.learner.gpus_per_rank, max_restarts=0, **place("learner", r),
        ).remote(cfg_dict, r, cfg.learner.ranks) for r in range(cfg.learner.ranks)]
        print(f"[t2dist] starting {cfg.rollout.actors} rollout actor(s), the evaluator and {cfg.learner.ranks} learner "
              f"rank(s): each loads {cfg.model.path} and its policy ({cfg.policy.kind}: SVD factors from the cache, "
              "or computed once)", flush=True)
        t0 = time.perf_counter()
        # the torch.distributed rendezvous lives on rank 0's node, wherever Ray put it
        ip = ray.get(self.learners[0].__ray_call__.remote(_actor_node_ip))
        addr, port = ray.get(self.learners[0].endpoint.remote(ip))
        names = [f"rollout actor {i}" for i in range(len(self.actors))] + ["evaluator"] + \
            [f"learner rank {r}" for r in range(len(self.learners))]
        infos = wait_all([a.ready.remote() for a in self.actors] + [self.evaluator.ready.remote()]
                         + [lw.connect.remote(addr, port) for lw in self.learners], names, t0)
        self.startup_s = time.perf_counter() - t0
        print(f"[t2dist] all {len(names)} ready after {self.startup_s:.0f}s", flush=True)
        self.fingerprint = infos[0]["fingerprint"]
        self.restarts = 0

    # rollout with fault handling --------------------------------------------------------------

    def sync(self, z_ref, version: int) -> float:
        """Send z to every actor and wait until each has recomposed W'; returns the seconds."""
        t0 = time.perf_counter()
        refs = [a.set_expert.remote(z_ref, version) for a in self.actors]
        for i, ref in enumerate(refs):
            # restarted with the base weights: sync it again, or its rollout would sample from W, not W'(z)
            self._get_or_redo(i, ref, lambda i=i: self.actors[i].set_expert.remote(z_ref, version), "during the sync")
        return time.perf_counter() - t0

    def _get_or_redo(self, i: int | None, ref, redo, when: str):
        """``ray.get(ref)``; when rollout actor ``i`` (``None``: the evaluator) died, wait for Ray's restart and
        ``redo()`` (a new ref) its work."""
        who = "the evaluator" if i is None else f"rollout actor {i}"
        for attempt in range(self.cfg.train.max_actor_restarts + 1):
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if attempt == self.cfg.train.max_actor_restarts:
                    raise TrainingError(f"{who} died {attempt + 1} times: {exc}") from None
                self.restarts += 1
                print(f"[t2dist] {who} died {when} ({type(exc).__name__}); restarting it and redoing its work",
                      flush=True)
                self._wait_alive(i)
                ref = redo()

    def evaluated(self, ref, z, split: str, limit: int | None, tag) -> dict:
        """The result of ``evaluator.evaluate(z, split, limit, tag)`` started as ``ref``; redone on a restarted
        evaluator when it died (e.g. killed by Ray for memory pressure) instead of ending the run."""
        return self._get_or_redo(None, ref, lambda: self.evaluator.evaluate.remote(z, split, limit, tag),
                                 f"evaluating on {split}")

    def start_rollout(self, z_ref, version: int, examples, step: int) -> PendingRollout:
        """Split ``examples`` over the actors (z already synced) and start sampling; returns at once."""
        n = len(self.actors)
        bounds = [round(k * len(examples) / n) for k in range(n + 1)]
        chunks = [examples[bounds[i]:bounds[i + 1]] for i in range(n)]
        seeds = [step_seed(self.cfg.rl.seed, step) + i * ACTOR_SEED_STRIDE for i in range(n)]
        refs = [self.actors[i].rollout.remote(chunks[i], seeds[i]) for i in range(n)]
        return PendingRollout(z_ref, version, chunks, seeds, refs)

    def finish_rollout(self, pending: PendingRollout) -> RolloutBatch:
        """Wait for every actor's share; a dead actor is restarted, re-synced, and its share redone."""
        def redo(i: int):
            self.actors[i].set_expert.remote(pending.z_ref, pending.version)  # restarted: base weights
            return self.actors[i].rollout.remote(pending.chunks[i], pending.seeds[i])

        return RolloutBatch.concat([self._get_or_redo(i, ref, lambda i=i: redo(i), "while sampling")
                                    for i, ref in enumerate(pending.refs)])

    def rollout(self, z_ref, version: int, examples, step: int) -> RolloutBatch:
        return self.finish_rollout(self.start_rollout(z_ref, version, examples, step))

    def _wait_alive(self, i: int | None, timeout: float = 300.0) -> None:
        actor, who = (self.evaluator, "the evaluator") if i is None else (self.actors[i], f"rollout actor {i}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=30)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise TrainingError(f"{who} did not come back within {timeout:.0f}s") from None
                time.sleep(0.5)

    # learner -------------------------------------------------------------------------------------
    def learn(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        normalizer = global_normalizer(batch, self.cfg.rl.loss_agg)
        shards = split_batch(batch, len(self.learners), advantages=advantages)
        refs = [lw.train_step.remote(b, a, normalizer) for lw, (b, a) in zip(self.learners, shards)]
        try:
            metrics = ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise LearnerDied(str(exc)) from None
        out = dict(metrics[0])
        for k in ("loss", "kl", "entropy", "pg_loss"):
            if k in metrics[0]:
                out[k] = sum(m[k] for m in metrics)  # each rank's share is normalised globally
        out["learn_s"] = max(m.get("seconds", 0.0) for m in metrics)
        return out

    def get_z(self) -> dict[str, torch.Tensor]:
        try:
            return ray.get(self.learners[0].get_z.remote())
        except ray.exceptions.RayActorError as exc:
            raise LearnerDied(str(exc)) from None

    def save_learners(self, directory: Path, step: int) -> None:
        """Every rank writes its DeepSpeed state (z, optimizer) under ``directory``."""
        ray.get([lw.save_checkpoint.remote(str(directory), "ds", {"step": step}) for lw in self.learners])

    def restore_learners(self, directory: Path, z: Mapping[str, torch.Tensor]) -> None:
        ray.get([lw.load_checkpoint.remote(str(directory), "ds") for lw in self.learners])
        ray.get([lw.set_z.remote(z) for lw in self.learners])

    def shutdown(self) -> None:
        for lw in self.learners:
            try:
                ray.get(lw.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        for a in self.actors + self.learners + [self.evaluator]:
            ray.kill(a)
        self.placement.remove()


class LearnerDied(TrainingError):
    pass


def _actor_node_ip(_actor) -> str:
    """Run inside an actor (``__ray_call__``): its node's address as the Ray cluster knows it."""
    return ray.util.get_node_ip_address()
