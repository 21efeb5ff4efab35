"""Where the driver's actors run: Ray placement groups from ``ray.placement``.

* ``none`` — every actor asks for its own CPUs/GPUs and Ray places it anywhere (the CPU demo).
* ``colocated`` — one placement group, strategy ``PACK``: a bundle per learner rank, then per
  rollout actor, then the evaluator. Ray fills as few nodes as possible, so rollout actors
  sit beside the learner ranks (with fractional ``gpus_per_actor``/``gpus_per_rank`` they can
  share a GPU; the learner releases cached CUDA memory after each step for them).
* ``separate`` — two groups: the learner ranks ``PACK``ed together (NCCL traffic stays inside
  a node where it fits), the rollout actors and evaluator ``SPREAD`` over the cluster.

The whole reservation is made (and waited for, ``ray.placement_timeout_s``) before any actor
starts, so a cluster that cannot hold the run fails with an error naming the keys instead of
hanging with half the actors started.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from t2dist.config import Config
from t2dist.errors import TrainingError


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A Ray bundle; an all-zero request still needs some resource to be a valid bundle."""
    b = {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    return b or {"CPU": 0.001}


def plan_bundles(cfg: Config) -> dict[str, list[dict[str, float]]]:
    """``{"learner": [...], "rollout": [...], "evaluator": [...]}``: one bundle per actor (pure)."""
    return {
        "learner": [bundle(cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank) for _ in range(cfg.learner.ranks)],
        "rollout": [bundle(cfg.rollout.cpus_per_actor, cfg.rollout.gpus_per_actor) for _ in range(cfg.rollout.actors)],
        "evaluator": [bundle(cfg.train.evaluator_cpus, cfg.train.evaluator_gpus)],
    }


@dataclass
class Placement:
    """Scheduling options per role and index (``{}`` when ``ray.placement`` is none)."""

    mode: str
    groups: list = field(default_factory=list)
    slots: dict = field(default_factory=dict)  # (role, i) -> (group, bundle index)

    def options(self, role: str, i: int = 0) -> dict:
        if (role, i) not in self.slots:
            return {}
        pg, index = self.slots[(role, i)]
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}

    def remove(self) -> None:
        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self.groups = []


def make_placement(cfg: Config) -> Placement:
    """Reserve the bundles for ``ray.placement`` and wait until Ray has placed them."""
    mode = cfg.ray.placement
    if mode == "none":
        return Placement(mode)
    plan = plan_bundles(cfg)
    roles = [(role, i) for role in ("learner", "rollout", "evaluator") for i in range(len(plan[role]))]
    if mode == "colocated":
        layout = [("PACK", roles)]
    else:
        layout = [("PACK", [r for r in roles if r[0] == "learner"]),
                  ("SPREAD", [r for r in roles if r[0] != "learner"])]
    placement = Placement(mode)
    for strategy, members in layout:
        pg = placement_group([plan[role][i] for role, i in members], strategy=strategy)
        placement.groups.append(pg)
        for index, slot in enumerate(members):
            placement.slots[slot] = (pg, index)
    try:
        ray.get([pg.ready() for pg in placement.groups], timeout=cfg.ray.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        placement.remove()
        raise TrainingError(
            f"ray.placement={mode!r}: Ray could not place the bundles within ray.placement_timeout_s="
            f"{cfg.ray.placement_timeout_s:g}s (learner {plan['learner'][0]} x {cfg.learner.ranks}, rollout "
            f"{plan['rollout'][0]} x {cfg.rollout.actors}, evaluator {plan['evaluator'][0]}); the cluster has "
            f"{ray.cluster_resources()}. Lower learner.*/rollout.* resources or use ray.placement=none"
        ) from None
    return placement
