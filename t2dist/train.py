"""The training driver (``t2dist train``): the one place that knows actors, learner and evaluator.

One step:

1. the next ``rl.prompts_per_step`` training prompts are split across the rollout actors;
2. z (kilobytes) goes to every actor once through the object store; each recomposes W'
   in place, samples ``rl.samples_per_prompt`` completions per prompt and scores them;
3. advantages are computed on the whole batch, the batch is split by prompt groups over
   the learner ranks, and each DeepSpeed rank takes its share of one data-parallel update;
4. every ``train.eval_every`` steps the evaluator scores z on the validation split in the
   background; every ``train.checkpoint_every`` steps a checkpoint is written.

At the end the best z (by validation accuracy) is evaluated on the test split, written as
an expert, and ``summary.json`` records base vs final accuracy.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path

import ray
import torch

from actors.evaluator import EvaluatorWorker
from actors.rollout import RolloutWorker, z_nbytes
from learner.group import global_normalizer, split_batch
from learner.worker import LearnerWorker
from t2dist.checkpoint import (begin_checkpoint, commit_checkpoint, latest_checkpoint, load_checkpoint,
                               prune_checkpoints, rng_state, set_rng_state)
from t2dist.config import Config, ConfigError, dump_config
from t2dist.errors import TrainingError
from t2dist.experts import save_expert
from t2dist.models import resolve_model_path
from t2dist.rl.data import PromptStream
from t2dist.rl.local import step_seed
from t2dist.rl.losses import compute_advantages
from t2dist.rl.rollout import RolloutBatch
from t2dist.svf.parametrization import Parametrization
from t2dist.tasks import get_task
from t2dist.tracking import Tracker

ACTOR_SEED_STRIDE = 7919  # actor i samples with step_seed + i * stride (actor 0 == train-local)




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
        from transformers import AutoTokenizer

        task.prompt_for(task.examples("test")[0], AutoTokenizer.from_pretrained(where))
    if cfg.registry.url or cfg.registry.name:
        check_registry(cfg)
    check_sharding(cfg)


def check_sharding(cfg: Config) -> None:
    """``learner.shard_factors``: R must divide every target's components and rows (shapes from a meta model)."""
    from t2dist.svf.sharded import check_shardable, target_shapes_from_config, use_sharding

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
    from t2dist.registry import Registry, RegistryError, check_name

    try:
        check_name(cfg.registry.name or cfg.task.name, "registry.name")
        if cfg.registry.alias:
            check_name(cfg.registry.alias, "registry.alias")
        if cfg.registry.url:
            Registry(registry_url(cfg), cfg.registry.storage_options, create=True)
    except RegistryError as exc:
        raise ConfigError(f"registry.url={cfg.registry.url!r}: {exc}") from None


def resources_needed(cfg: Config) -> dict[str, float]:
    return {
        "CPU": cfg.rollout.actors * cfg.rollout.cpus_per_actor + cfg.learner.ranks * cfg.learner.cpus_per_rank
        + cfg.train.evaluator_cpus,
        "GPU": cfg.rollout.actors * cfg.rollout.gpus_per_actor + cfg.learner.ranks * cfg.learner.gpus_per_rank
        + cfg.train.evaluator_gpus,
    }


def connect_ray(cfg: Config) -> str:
    """Join a running cluster (``ray job submit``, ``ray start``) or start a local one."""
    if ray.is_initialized():
        return "existing"
    need = resources_needed(cfg)
    if cfg.ray.address != "local":
        try:
            ray.init(address=cfg.ray.address, log_to_driver=True)
            return "cluster"
        except ConnectionError:
            if cfg.ray.address != "auto":
                raise TrainingError(f"cannot reach the Ray cluster at ray.address={cfg.ray.address!r}") from None
    num_cpus = cfg.ray.num_cpus or max(int(need["CPU"] + 0.999), os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, num_gpus=int(need["GPU"] + 0.999) if need["GPU"] else None,
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


def default_run_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


# -- the driver ---------------------------------------------------------------------------------
class Driver:
    def __init__(self, cfg: Config, run_dir: Path, progress: bool = True):
        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        from t2dist.runtime import policy_parametrization

        self.param = policy_parametrization(cfg)  # SVF scales, or LoRA (whose z/* histograms show A and B)
        self.task = get_task(cfg.task.name)
        cfg_dict = dump_config(cfg)
        self.tag = f"{os.getpid()}-{int(time.time() * 1000) % 10**8}"  # actor names: t2dist-<role>-<i>-<tag>
        from actors.placement import make_placement

        self.placement = make_placement(cfg)  # ray.placement: none | colocated | separate (actors/placement.py)
        place = self.placement.options
        actor_cls = ray.remote(RolloutWorker)
        self.actors = [actor_cls.options(
            name=f"t2dist-rollout-{i}-{self.tag}", num_cpus=cfg.rollout.cpus_per_actor,
            num_gpus=cfg.rollout.gpus_per_actor, max_restarts=cfg.train.max_actor_restarts, max_task_retries=0,
            **place("rollout", i),
        ).remote(cfg_dict, i) for i in range(cfg.rollout.actors)]
        self.evaluator = ray.remote(EvaluatorWorker).options(
            num_cpus=cfg.train.evaluator_cpus, num_gpus=cfg.train.evaluator_gpus, max_restarts=1,
            **place("evaluator"),
        ).remote(cfg_dict, -1)
        learner_cls = ray.remote(LearnerWorker)
        self.learners = [learner_cls.options(
            name=f"t2dist-learner-{r}-{self.tag}", num_cpus=cfg.learner.cpus_per_rank,
            num_gpus=cfg.learner.gpus_per_rank, max_restarts=0, **place("learner", r),
        ).remote(cfg_dict, r, cfg.learner.ranks) for r in range(cfg.learner.ranks)]
        # the torch.distributed rendezvous lives on rank 0's node, wherever Ray put it
        ip = ray.get(self.learners[0].__ray_call__.remote(_actor_node_ip))
        addr, port = ray.get(self.learners[0].endpoint.remote(ip))
        infos = ray.get([a.ready.remote() for a in self.actors] + [self.evaluator.ready.remote()]
                        + [lw.connect.remote(addr, port) for lw in self.learners])
        self.fingerprint = infos[0]["fingerprint"]
        self.restarts = 0

    # rollout with fault handling --------------------------------------------------------------

    def sync(self, z_ref, version: int) -> float:
        """Send z to every actor and wait until each has recomposed W'; returns the seconds."""
        t0 = time.perf_counter()
        refs = [a.set_expert.remote(z_ref, version) for a in self.actors]
        for ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # a dead actor is restarted and re-synced by rollout()
        return time.perf_counter() - t0

    def rollout(self, z_ref, version: int, examples, step: int) -> RolloutBatch:
        n = len(self.actors)
        bounds = [round(k * len(examples) / n) for k in range(n + 1)]
        chunks = [examples[bounds[i]:bounds[i + 1]] for i in range(n)]
        seeds = [step_seed(self.cfg.rl.seed, step) + i * ACTOR_SEED_STRIDE for i in range(n)]
        refs = [self.actors[i].rollout.remote(chunks[i], seeds[i]) for i in range(n)]  # z already synced
        results = []
        for i, ref in enumerate(refs):
            for attempt in range(self.cfg.train.max_actor_restarts + 1):
                try:
                    results.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as exc:
                    if attempt == self.cfg.train.max_actor_restarts:
                        raise TrainingError(f"rollout actor {i} died {attempt + 1} times: {exc}") from None
                    self.restarts += 1
                    print(f"[t2dist] rollout actor {i} died ({type(exc).__name__}); restarting it and redoing its work",
                          flush=True)
                    self._wait_alive(i)
                    self.actors[i].set_expert.remote(z_ref, version)  # the restarted actor holds base weights
                    ref = self.actors[i].rollout.remote(chunks[i], seeds[i])
        return RolloutBatch.concat(results)

    def _wait_alive(self, i: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.get(self.actors[i].ready.remote(), timeout=30)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise TrainingError(f"rollout actor {i} did not come back within {timeout:.0f}s") from None
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

    def save_checkpoint(self, step: int, z, state: dict) -> Path:
        tmp, final = begin_checkpoint(self.run_dir, step)
        ray.get([lw.save_checkpoint.remote(str(tmp / "learner"), "ds", {"step": step}) for lw in self.learners])
        path = commit_checkpoint(tmp, final, z, state)
        prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return path

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


def _fmt_line(step: int, steps: int, rec: dict) -> str:
    return (f"step {step:>4}/{steps}  reward {rec['reward']:+.3f}  acc {rec['accuracy']:.3f}  "
            f"kl {rec.get('kl', 0.0):.5f}  len {rec['response_length']:.1f}  {rec['step_s']:.2f}s")


def train(cfg: Config, *, resume: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Run (or resume) one distributed SVF-RL job; returns the summary (also in summary.json)."""
    wall0 = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    else:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        ckpt = None
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"run_dir {run_dir} already holds a run; use --resume {run_dir} or another run_dir")
    preflight(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dump_config(cfg), indent=2))
    mode = connect_ray(cfg)
    check_resources(cfg)
    where = {"cluster": "joined a running Ray cluster", "local": "started a local Ray cluster",
             "existing": "using the Ray cluster of this process"}[mode]
    print(f"[t2dist] run dir {run_dir}; {where} {ray.cluster_resources()}", flush=True)

    driver = Driver(cfg, run_dir, progress)
    tracker = Tracker(run_dir)
    try:
        return _loop(cfg, driver, tracker, run_dir, ckpt, wall0)
    finally:
        tracker.close()
        driver.shutdown()


def _loop(cfg: Config, driver: Driver, tracker: Tracker, run_dir: Path, ckpt, wall0: float) -> dict:
    rl = cfg.rl
    task = driver.task
    torch.manual_seed(rl.seed)
    if ckpt is not None:
        z, state = load_checkpoint(ckpt)
        set_rng_state(state["rng"])
        ray.get([lw.load_checkpoint.remote(str(ckpt / "learner"), "ds") for lw in driver.learners])
        ray.get([lw.set_z.remote(z) for lw in driver.learners])
        print(f"[t2dist] resumed from {ckpt} at step {state['step']}", flush=True)
    else:
        z = driver.get_z()
        state = {"step": 0, "position": 0, "best": {"accuracy": -1.0, "step": 0}, "history": [],
                 "evals": [], "base": None, "wall_seconds": 0.0}
    stream = PromptStream(task.examples("train"), rl.seed, position=state["position"])
    best_z = z if state["best"]["step"] == 0 else None
    if ckpt is not None and (ckpt / "best_z.safetensors").is_file():
        from safetensors.torch import load_file

        best_z = load_file(str(ckpt / "best_z.safetensors"))
    base_ref = None
    if state["base"] is None:
        base_ref = driver.evaluator.evaluate.remote(None, "test", cfg.eval.limit, None)
    pending: list = []  # (step, ref, z) validation evaluations in flight

    def collect(block: bool) -> None:
        nonlocal best_z
        while pending:
            ready, _ = ray.wait([p[1] for p in pending], num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            idx = next(i for i, p in enumerate(pending) if p[1] == ready[0])
            step_e, ref, z_e = pending.pop(idx)
            res = ray.get(ref)
            state["evals"].append({"step": step_e, "accuracy": res["accuracy"], "seconds": res["seconds"]})
            tracker.scalars(step_e, {"eval/val_accuracy": res["accuracy"], "time/eval_s": res["seconds"]})
            if res["accuracy"] > state["best"]["accuracy"]:
                state["best"] = {"accuracy": res["accuracy"], "step": step_e}
                best_z = z_e

    steps = rl.steps
    t_run = time.perf_counter()
    for step in range(state["step"], steps):
        t0 = time.perf_counter()
        examples = stream.next_batch(rl.prompts_per_step)
        z_ref = ray.put(z)
        sync_s = driver.sync(z_ref, step)
        batch = driver.rollout(z_ref, step, examples, step)
        t1 = time.perf_counter()
        advantages = compute_advantages(batch.rewards, rl.advantage)
        try:
            lrec = driver.learn(batch, advantages)
            z = driver.get_z()
        except LearnerDied as exc:
            last = latest_checkpoint(run_dir)
            where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"a learner rank died at step {step + 1} ({exc}); {where}; "
                                f"continue with: t2dist train --resume {run_dir}") from None
        t2 = time.perf_counter()
        rec = {
            "step": step + 1,
            "reward": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std()),
            "accuracy": float(batch.correct.float().mean()),
            "response_length": float(batch.lengths.float().mean()),
            "sync_s": sync_s,
            "rollout_s": t1 - t0 - sync_s,
            "generate_s": batch.seconds.get("generate", 0.0),
            "scoring_s": batch.seconds.get("score", 0.0),
            "learner_s": t2 - t1,
            "sync_bytes": z_nbytes(z) * len(driver.actors),
            "tokens_per_s": batch.num_tokens / max(t1 - t0, 1e-9),
            "step_s": t2 - t0,
            **{k: v for k, v in lrec.items() if isinstance(v, (int, float))},
        }
        state["history"].append(rec)
        tracker.scalars(step + 1, {
            "train/reward_mean": rec["reward"], "train/reward_std": rec["reward_std"],
            "train/accuracy": rec["accuracy"], "train/kl": rec.get("kl", 0.0), "train/loss": rec.get("loss", 0.0),
            "train/entropy": rec.get("entropy", 0.0), "train/grad_norm": rec.get("grad_norm", 0.0),
            "train/response_length": rec["response_length"], "time/rollout_s": rec["rollout_s"],
            "time/sync_s": rec["sync_s"], "time/generate_s": rec["generate_s"], "time/scoring_s": rec["scoring_s"],
            "time/learner_s": rec["learner_s"], "time/step_s": rec["step_s"], "time/tokens_per_s": rec["tokens_per_s"],
            "sync/bytes_per_step": rec["sync_bytes"],
        })
        tracker.z(step + 1, z, driver.param)
        if driver.progress:
            print(_fmt_line(step + 1, steps, rec), flush=True)
        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == steps:
            pending.append((step + 1, driver.evaluator.evaluate.remote(z, "validation", cfg.train.eval_limit, step + 1), z))
        collect(block=False)
        state["step"] = step + 1
        state["position"] = stream.position
        if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == steps:
            collect(block=True)
            state["rng"] = rng_state()
            state["wall_seconds"] += time.perf_counter() - t_run
            t_run = time.perf_counter()
            if base_ref is not None:
                state["base"] = ray.get(base_ref)
                base_ref = None
            path = driver.save_checkpoint(step + 1, z, state)
            if best_z is not None:
                from safetensors.torch import save_file

                save_file({k: v.float().contiguous() for k, v in best_z.items()}, str(path / "best_z.safetensors"))
    collect(block=True)
    if base_ref is not None:
        state["base"] = ray.get(base_ref)
    if best_z is None:
        best_z = z
    final = ray.get(driver.evaluator.evaluate.remote(best_z, "test", cfg.eval.limit, "best"))
    last = ray.get(driver.evaluator.evaluate.remote(z, "test", cfg.eval.limit, "last"))
    base = state["base"]
    expert_dir = run_dir / "expert"
    metrics = {"test_accuracy": final["accuracy"], "test_ci": [final["ci_low"], final["ci_high"]],
               "base_test_accuracy": base["accuracy"], "best_val_accuracy": state["best"]["accuracy"],
               "best_step": state["best"]["step"], "test_n": final["n"],
               "val_split": "validation", "val_limit": cfg.train.eval_limit}
    curve = {"steps": steps, "evals": state["evals"],
             "reward_first": state["history"][0]["reward"] if state["history"] else None,
             "reward_last": state["history"][-1]["reward"] if state["history"] else None}
    card = ray.get(driver.evaluator.card.remote(cfg.name, metrics, dump_config(cfg), {"training_curve": curve}))
    save_expert(expert_dir, best_z, card)
    published = None
    if cfg.registry.url:
        published = ray.get(driver.evaluator.publish.remote(
            best_z, card, url=registry_url(cfg), storage_options=cfg.registry.storage_options,
            name=cfg.registry.name or task.name, alias=cfg.registry.alias,
            val_accuracy=state["best"]["accuracy"], val_limit=cfg.train.eval_limit))
        print(f"[t2dist] published {published['ref']} to {published['registry']}"
              + (f"; {published['alias']}: {'moved' if published['promoted'] else 'kept'} ({published.get('reason', '')})"
                 if published["alias"] else ""), flush=True)
    wall = state["wall_seconds"] + (time.perf_counter() - t_run)
    summary = {
        "name": cfg.name, "task": task.name, "model": cfg.model.path, "steps": steps,
        "base_accuracy": base["accuracy"], "base_ci": [base["ci_low"], base["ci_high"]],
        "final_accuracy": final["accuracy"], "final_ci": [final["ci_low"], final["ci_high"]],
        "last_accuracy": last["accuracy"], "gain": final["accuracy"] - base["accuracy"],
        "best_val_accuracy": state["best"]["accuracy"], "best_step": state["best"]["step"],
        "n_test": final["n"], "wall_seconds": time.perf_counter() - wall0, "train_seconds": wall,
        "actor_restarts": driver.restarts, "expert": str(expert_dir), "run_dir": str(run_dir),
        "published": published,
    }
    tracker.scalars(steps, {"eval/test_accuracy": final["accuracy"], "eval/base_test_accuracy": base["accuracy"]})
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run_dir / "summary.json")
    print(f"[t2dist] test accuracy {base['accuracy']:.3f} -> {final['accuracy']:.3f} "
          f"(95% CI {final['ci_low']:.3f}-{final['ci_high']:.3f}); expert {expert_dir}; "
          f"summary {run_dir / 'summary.json'}", flush=True)
    return summary
