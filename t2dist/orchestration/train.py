"""The training loop (``t2dist train``): one step reads top to bottom in ``Trainer.fit``.

One step (``Trainer.train_step``):

1. the next ``rl.prompts_per_step`` training prompts are split across the rollout actors;
2. z (kilobytes) goes to every actor once through the object store; each recomposes W'
   in place, samples ``rl.samples_per_prompt`` completions per prompt and scores them;
3. advantages are computed on the whole batch, the batch is split by prompt groups over
   the learner ranks, and each DeepSpeed rank takes its share of one data-parallel update;
4. every ``train.eval_every`` steps the evaluator scores z on the validation split in the
   background (``BackgroundEvals``, which keeps the best z in a ``BestTracker``); every
   ``train.checkpoint_every`` steps the ``Checkpointer`` writes z, the best z, the learner
   ranks' state and the typed ``RunState`` (``t2dist/orchestration/run_state.py``).

With ``rl.off_policy_steps=1`` step s+1's batch is sampled with z_(s-1) while the learner
computes z_s (``Trainer`` says how, and how a checkpoint keeps the batch in flight).

At the end (``Trainer.finish``) the best z (by validation accuracy) is evaluated on the test
split, written as an expert, published when ``registry.url`` is set, and ``summary.json``
records base vs final accuracy. The actors live in ``t2dist/orchestration/driver.py``; where the outputs
go (``output_root``, Ray jobs) in ``t2dist/orchestration/paths.py``.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from transformers import AutoTokenizer

from actors.rollout import z_nbytes
from t2dist.atomic import atomic_write_json
from t2dist.config import Config, ConfigError, dump_config
from t2dist.errors import Interrupted, TrainingError
from t2dist.hardware import command_line, machine_line
from t2dist.experts.expert import save_expert
from t2dist.models.loading import resolve_model_path
from t2dist.orchestration import checkpoint
from t2dist.orchestration.checkpoint import (ROLLOUT_Z, begin_checkpoint, latest_checkpoint, load_checkpoint,
                                             load_extra_z, prune_checkpoints, rng_state, set_rng_state)
from t2dist.orchestration.driver import (Driver, LearnerDied, PendingRollout, check_resources, connect_ray,  # noqa: F401
                                         resources_needed)  # (resources_needed: bench/pipeline.py imports it here)
from t2dist.orchestration.paths import resolve_outputs
from t2dist.orchestration.run_state import (Best, BestTracker, FinalResult, RunState, StepTimes, format_step,
                                            integrity_totals, step_record, tb_scalars, training_curve)
from t2dist.orchestration.tracking import Tracker
from t2dist.policy.load import policy_parametrization
from t2dist.registry import Registry, RegistryError, check_name
from t2dist.rl.data import training_stream
from t2dist.rl.losses import compute_advantages
from t2dist.svf.sharded import check_shardable, target_shapes_from_config, use_sharding
from t2dist.tasks import get_task


# -- checks before anything starts -----------------------------------------------------------
def preflight(cfg: Config) -> None:
    """Every check that needs no cluster: raise before Ray or any actor starts."""
    rl, lc = cfg.rl, cfg.learner
    if rl.prompts_per_step % lc.ranks:
        raise ConfigError(f"learner.ranks={lc.ranks} must divide rl.prompts_per_step={rl.prompts_per_step} "
                          "(each rank takes whole prompt groups)")
    if rl.prompts_per_step < cfg.rollout.actors:
        raise ConfigError(f"rollout.actors={cfg.rollout.actors} exceeds rl.prompts_per_step={rl.prompts_per_step}")
    where = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    task = get_task(cfg.task.name)
    for split in ("train", "validation", "test"):
        if not task.examples(split):
            raise ConfigError(f"task {task.name!r} has an empty {split} split")
    if task.chat == "required":  # a model without a chat template fails here, not inside the actors
        task.prompt_for(task.examples("test")[0], AutoTokenizer.from_pretrained(where))
    if cfg.registry.url or cfg.registry.name:
        check_registry(cfg)
    check_sharding(cfg)


def check_sharding(cfg: Config) -> None:
    """``learner.shard_factors``: R must divide every target's components and rows (shapes from a meta model)."""
    if not use_sharding(cfg):
        return
    try:
        shapes = target_shapes_from_config(cfg)
    except (OSError, ImportError, KeyError, ValueError) as exc:  # no readable config here: each rank checks again
        print(f"[t2dist] note: cannot read target shapes for the sharding check here ({exc})", flush=True)
        return
    check_shardable(cfg, shapes)


def registry_url(cfg: Config) -> str | None:
    """The registry URL with a local path made absolute (actors may run in another directory)."""
    url = cfg.registry.url
    if url and "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url


def check_registry(cfg: Config) -> None:
    """The registry must be writable and the expert name valid before any actor starts."""
    try:
        check_name(cfg.registry.name or cfg.task.name, "registry.name")
        if cfg.registry.alias:
            check_name(cfg.registry.alias, "registry.alias")
        if cfg.registry.url:
            Registry(registry_url(cfg), cfg.registry.storage_options, create=True)
    except RegistryError as exc:
        raise ConfigError(f"registry.url={cfg.registry.url!r}: {exc}") from None


def default_run_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def open_run(cfg: Config, resume: str | os.PathLike | None) -> tuple[Config, Path, Path | None]:
    """The config with its output paths resolved (``t2dist/orchestration/paths.py``), the run directory, the checkpoint to resume."""
    cfg, run_dir = resolve_outputs(cfg, resume if resume is not None else (cfg.run_dir or default_run_dir(cfg)))
    ckpt = latest_checkpoint(run_dir)
    if resume is not None and ckpt is None:
        raise ConfigError(f"--resume {resume}: no complete checkpoint in {run_dir / 'checkpoints'}")
    if resume is None and ckpt is not None:
        raise ConfigError(f"run_dir {run_dir} already holds a run; use --resume {run_dir} or another run_dir")
    return cfg, run_dir, ckpt


def train(cfg: Config, *, resume: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Run (or resume) one distributed SVF-RL job; returns the summary (also in summary.json).

    Ctrl-C ends it with :class:`t2dist.errors.Interrupted`, whose one line says what was kept."""
    wall0 = time.perf_counter()
    cfg, run_dir, ckpt = open_run(cfg, resume)
    try:
        return _run(cfg, run_dir, ckpt, progress, wall0)
    except KeyboardInterrupt:
        raise Interrupted(what_was_kept(run_dir)) from None


def what_was_kept(run_dir: Path) -> str:
    """One line: the last complete checkpoint (its path and step) and how to go on, or that there is none."""
    last = latest_checkpoint(run_dir)
    if last is None:
        return f"[t2dist] interrupted: nothing kept yet (no checkpoint in {run_dir})"
    _, state = load_checkpoint(last)
    return (f"[t2dist] interrupted: kept the checkpoint of step {state['step']}, {last} "
            f"(go on with: t2dist train --resume {run_dir})")


def _run(cfg: Config, run_dir: Path, ckpt: Path | None, progress: bool, wall0: float) -> dict:
    preflight(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", dump_config(cfg))
    mode = connect_ray(cfg)
    check_resources(cfg)
    where = {"cluster": "joined a running Ray cluster", "local": "started a local Ray cluster",
             "existing": "using the Ray cluster of this process"}[mode]
    print(f"[t2dist] run dir {run_dir}; {where} {ray.cluster_resources()}", flush=True)

    driver = Driver(cfg)
    tracker = Tracker(run_dir)
    try:
        return Trainer(cfg, driver, tracker, run_dir, progress).fit(ckpt, wall0)
    finally:
        tracker.close()
        driver.shutdown()


# -- the steps of a run ---------------------------------------------------------------------------
class Checkpointer:
    """A checkpoint every ``train.checkpoint_every`` steps and at the last; the newest ``train.keep_checkpoints`` stay."""

    def __init__(self, cfg: Config, driver: Driver, run_dir: Path):
        self.driver, self.run_dir = driver, run_dir
        self.every, self.keep, self.steps = cfg.train.checkpoint_every, cfg.train.keep_checkpoints, cfg.rl.steps

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def save(self, step: int, z, state: RunState, best_z, rollout_z=None) -> Path:
        """Learner ranks, z, best z and state all go into the temporary directory before it is renamed."""
        tmp, final = begin_checkpoint(self.run_dir, step)
        self.driver.save_learners(tmp / "learner", step)
        path = checkpoint.commit_checkpoint(tmp, final, z, state.to_json(), best_z, rollout_z)
        prune_checkpoints(self.run_dir, self.keep)
        return path

    def restore(self, ckpt: Path) -> tuple[RunState, dict, dict, dict | None]:
        """State, z, best z and the z of a batch in flight (off-policy; else None) of ``ckpt``.

        The learner ranks and this process's RNGs are restored.
        """
        z, data = load_checkpoint(ckpt)
        state = RunState.from_json(data)
        set_rng_state(state.rng)
        self.driver.restore_learners(ckpt / "learner", z)
        best_z = load_extra_z(ckpt)
        if best_z is None:
            if state.best.step:  # written by a version that stored the best z after the commit, and crashed
                print(f"[t2dist] warning: {ckpt} lacks the best z of step {state.best.step}; the best is chosen "
                      "again among the validation results after resuming", flush=True)
                state.best = Best()
            best_z = z
        print(f"[t2dist] resumed from {ckpt} at step {state.step}", flush=True)
        return state, z, best_z, load_extra_z(ckpt, ROLLOUT_Z)


class BackgroundEvals:
    """Validation evaluations of z on the evaluator actor, in flight while training goes on."""

    def __init__(self, cfg: Config, driver, state: RunState, best: BestTracker, tracker: Tracker):
        self.driver, self.state, self.best, self.tracker = driver, state, best, tracker
        self.every, self.limit, self.steps = cfg.train.eval_every, cfg.train.eval_limit, cfg.rl.steps
        self.background = cfg.train.background_evals
        self.pending: list[tuple[int, ray.ObjectRef, dict]] = []  # (step, result, z)

    def maybe_evaluate(self, step: int, z) -> None:
        if step % self.every == 0 or step == self.steps:
            self.pending.append((step, self.driver.evaluator.evaluate.remote(z, "validation", self.limit, step), z))
        self.collect(block=not self.background)

    def collect(self, block: bool) -> None:
        """Record the finished evaluations (all of them when ``block``), oldest finished first."""
        while self.pending:
            ready, _ = ray.wait([p[1] for p in self.pending], num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            step, ref, z = self.pending.pop(next(i for i, p in enumerate(self.pending) if p[1] == ready[0]))
            res = self.driver.evaluated(ref, z, "validation", self.limit, step)
            self.state.evals.append({"step": step, "accuracy": res["accuracy"], "seconds": res["seconds"]})
            self.tracker.scalars(step, {"eval/val_accuracy": res["accuracy"], "time/eval_s": res["seconds"]})
            self.best.offer(step, res["accuracy"], z)


@dataclass
class Generation:
    """One step's batch being sampled: the rollout in flight, the z it samples with, its prompts, the sync time."""

    pending: PendingRollout
    z: dict
    prompts: int
    sync_s: float


class Trainer:
    """One run from its first (or resumed) step to the summary; ``fit`` is the loop.

    ``rl.off_policy_steps=1`` changes one thing: ``train_step`` starts sampling step s+1's batch
    with z_(s-1) before the learner computes z_s from step s's batch, so generation and learning
    overlap (batch s is sampled with z_(s-2), one step older than on-policy). A checkpoint keeps
    that in-flight batch's z (``rollout_z``) and counts its prompts as not consumed, so resume
    resamples it exactly. 0 is the on-policy loop, unchanged.
    """

    def __init__(self, cfg: Config, driver: Driver, tracker: Tracker, run_dir: Path, progress: bool = True):
        self.cfg, self.driver, self.tracker, self.run_dir, self.progress = cfg, driver, tracker, run_dir, progress
        self.task = get_task(cfg.task.name)
        self.param = policy_parametrization(cfg)  # SVF scales, or LoRA (whose z/* histograms show A and B)
        self.checkpointer = Checkpointer(cfg, driver, run_dir)

    def fit(self, ckpt: Path | None, wall0: float) -> dict:
        torch.manual_seed(self.cfg.rl.seed)
        self.start(ckpt)
        for step in range(self.state.step + 1, self.cfg.rl.steps + 1):  # steps count from 1
            self.train_step(step)
            self.evals.maybe_evaluate(step, self.z)
            self.settle_base(block=False)
            self.state.step, self.state.position = step, self.consumed_position()
            self.maybe_checkpoint(step)
        return self.finish(wall0)

    def start(self, ckpt: Path | None) -> None:
        """Fresh or resumed run state, z, best z, prompt stream; the base model's test evaluation starts."""
        if ckpt is not None:
            self.state, self.z, best_z, rollout_z = self.checkpointer.restore(ckpt)
        else:
            self.state, self.z, rollout_z = RunState(), self.driver.get_z(), None
            best_z = self.z
        self.lag = self.cfg.rl.off_policy_steps
        self.prefetched: Generation | None = None  # off-policy: the next step's batch, in flight
        self.lagged_z = rollout_z if self.lag else None  # off-policy resume: z of the batch that was in flight
        self.best = BestTracker(self.state, best_z)
        self.evals = BackgroundEvals(self.cfg, self.driver, self.state, self.best, self.tracker)
        self.stream = training_stream(self.task, self.cfg.task.option_order, self.cfg.rl.seed, self.state.position)
        self.base_ref = None
        if self.state.base is None:
            n = len(self.task.examples("test")[: self.cfg.eval.limit])
            when = ("in the background (its line follows when it is done)" if self.cfg.train.background_evals
                    else "before the first step (train.background_evals false)")
            print(f"[t2dist] base model: test accuracy on {n} examples, measured by the evaluator {when}", flush=True)
            self.base_ref = self.driver.evaluator.evaluate.remote(None, "test", self.cfg.eval.limit, None)
            self.settle_base(block=not self.cfg.train.background_evals)
        self.tracker.scalars(self.state.step, {"time/startup_s": self.driver.startup_s})
        self.t_run = time.perf_counter()

    def train_step(self, step: int) -> dict:
        """Batch of ``step`` (sampled now, or prefetched), learner update: z becomes z of ``step``; returns the record."""
        t0 = time.perf_counter()
        z = self.lagged_z if self.lagged_z is not None else self.z  # lagged: a resumed off-policy run
        gen, self.prefetched = self.prefetched or self.generate(step, z), None
        self.lagged_z = None
        batch = self.driver.finish_rollout(gen.pending)
        sync_s = gen.sync_s if self.lag == 0 else 0.0  # a prefetched batch's sync belongs to the step before
        if self.lag and step < self.cfg.rl.steps:
            self.prefetched = self.generate(step + 1, self.z)  # z_(step-1), sampled while the learner works
            sync_s += self.prefetched.sync_s
        t1 = time.perf_counter()
        learner = self.learn(step, batch)
        times = StepTimes(sync_s=sync_s, rollout_s=t1 - t0 - sync_s, learner_s=time.perf_counter() - t1)
        rec = step_record(step, batch, learner, times, sync_bytes=z_nbytes(self.z) * len(self.driver.actors))
        self.log(rec)
        return rec

    def generate(self, step: int, z) -> Generation:
        """Sync ``z`` to the actors and start sampling the batch of ``step`` (seed and prompts of that step)."""
        examples = self.stream.next_batch(self.cfg.rl.prompts_per_step)
        version = max(step - 1 - self.lag, 0)  # z_v is z after v updates; on-policy, step s samples with z_(s-1)
        z_ref = ray.put(z)
        sync_s = self.driver.sync(z_ref, version)
        pending = self.driver.start_rollout(z_ref, version, examples, step - 1)  # seed of step s: s-1 (as train-local)
        return Generation(pending, z, len(examples), sync_s)

    def consumed_position(self) -> int:
        """Prompts the learner has consumed: a prefetched batch's prompts are sampled again after a resume."""
        return self.stream.position - (self.prefetched.prompts if self.prefetched else 0)

    def learn(self, step: int, batch) -> dict:
        """One data-parallel update on ``batch``; ``self.z`` becomes the new z. A dead rank stops the run."""
        advantages = compute_advantages(batch.rewards, self.cfg.rl.advantage)
        try:
            metrics = self.driver.learn(batch, advantages)
            self.z = self.driver.get_z()
        except LearnerDied as exc:
            last = latest_checkpoint(self.run_dir)
            where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"a learner rank died at step {step} ({exc}); {where}; "
                                f"continue with: t2dist train --resume {self.run_dir}") from None
        return metrics

    def log(self, rec: dict) -> None:
        self.state.history.append(rec)
        self.tracker.scalars(rec["step"], tb_scalars(rec))
        self.tracker.z(rec["step"], self.z, self.param)
        if self.progress:
            print(format_step(rec, self.cfg.rl.steps), flush=True)

    def maybe_checkpoint(self, step: int) -> None:
        if not self.checkpointer.due(step):
            return
        self.evals.collect(block=True)  # the best z is settled up to this step
        self.state.rng = rng_state()
        now = time.perf_counter()
        self.state.wall_seconds += now - self.t_run
        self.t_run = now
        self.settle_base(block=True)
        self.checkpointer.save(step, self.z, self.state, self.best.z, self.prefetched.z if self.prefetched else None)

    def settle_base(self, block: bool) -> None:
        """The base model's test result, once the evaluator has it (``block``: wait for it): printed, and in TensorBoard."""
        if self.base_ref is None or (not block and not ray.wait([self.base_ref], timeout=0)[0]):
            return
        self.state.base = self.driver.evaluated(self.base_ref, None, "test", self.cfg.eval.limit, None)
        self.base_ref = None
        b = self.state.base
        print(f"[t2dist] base model test accuracy {b['accuracy']:.3f} (95% CI {b['ci_low']:.3f}-{b['ci_high']:.3f}, "
              f"n={b['n']}, {b['seconds']:.0f}s)", flush=True)
        self.tracker.scalars(self.state.step, {"eval/base_test_accuracy": b["accuracy"], "time/base_eval_s": b["seconds"]})

    # the end of a run -------------------------------------------------------------------------------
    def finish(self, wall0: float) -> dict:
        """Test the best and the last z, write the expert, publish it, write ``summary.json``."""
        cfg, state, ev = self.cfg, self.state, self.driver.evaluator
        self.evals.collect(block=True)
        self.settle_base(block=True)

        def test(z, tag: str) -> dict:
            return self.driver.evaluated(ev.evaluate.remote(z, "test", cfg.eval.limit, tag), z, "test", cfg.eval.limit, tag)

        best = test(self.best.z, "best")  # the last z is the best one when the last evaluation won: same numbers
        result = FinalResult(base=state.base, best=best, last=best if self.best.z is self.z else test(self.z, "last"))
        expert_dir = self.run_dir / "expert"
        card = ray.get(ev.card.remote(cfg.name, result.card_metrics(state, cfg.train.eval_limit), dump_config(cfg),
                                      {"training_curve": training_curve(state, cfg.rl.steps),
                                       "command": command_line(), "trained_on": machine_line(cfg.model.device)}))
        save_expert(expert_dir, self.best.z, card)
        published = self.publish(card) if cfg.registry.url else None
        summary = {
            "name": cfg.name, "task": self.task.name, "model": cfg.model.path, "steps": cfg.rl.steps,
            **result.summary(state), **integrity_totals(state.history), "wall_seconds": time.perf_counter() - wall0,
            "train_seconds": state.wall_seconds + (time.perf_counter() - self.t_run),
            "actor_restarts": self.driver.restarts, "expert": str(expert_dir), "run_dir": str(self.run_dir),
            "published": published,
        }
        self.tracker.scalars(cfg.rl.steps, {"eval/test_accuracy": result.best["accuracy"],
                                            "eval/base_test_accuracy": result.base["accuracy"]})
        atomic_write_json(self.run_dir / "summary.json", summary)
        print(f"[t2dist] test accuracy {result.base['accuracy']:.3f} -> {result.best['accuracy']:.3f} "
              f"(95% CI {result.best['ci_low']:.3f}-{result.best['ci_high']:.3f}); expert {expert_dir}; "
              f"summary {self.run_dir / 'summary.json'}", flush=True)
        return summary

    def publish(self, card: dict) -> dict:
        """The best z into the registry; the evaluator moves the alias only when it beats the current holder."""
        cfg = self.cfg
        published = ray.get(self.driver.evaluator.publish.remote(
            self.best.z, card, url=registry_url(cfg), storage_options=cfg.registry.storage_options,
            name=cfg.registry.name or self.task.name, alias=cfg.registry.alias,
            val_accuracy=self.state.best.accuracy, val_limit=cfg.train.eval_limit))
        print(f"[t2dist] published {published['ref']} to {published['registry']}"
              + (f"; {published['alias']}: {'moved' if published['promoted'] else 'kept'} ({published.get('reason', '')})"
                 if published["alias"] else ""), flush=True)
        return published
