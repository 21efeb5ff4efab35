"""The distributed pipeline end to end on a real local Ray cluster with real DeepSpeed learners."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from child_processes import sigint_as_in_a_terminal
from t2dist.orchestration.checkpoint import latest_checkpoint, load_checkpoint
from t2dist.config import ConfigError, load_config
from t2dist.engines.hf import HFEngine
from t2dist.errors import TrainingError
from t2dist.hardware import command_line, cpu_name, machine_line

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
SMALL = ["rl.prompts_per_step=8", "rl.samples_per_prompt=4", "eval.limit=40", "train.eval_limit=40",
         "rl.lr=0.02"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def kill_when_checkpointed(run_dir, prefix, no_restart=True, timeout=180):
    """In a thread: once ``run_dir`` has a checkpoint, kill the named actor starting with ``prefix``."""
    killed = []

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if latest_checkpoint(run_dir) is not None:
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    if actor["name"].startswith(prefix):
                        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=no_restart)
                        killed.append(actor["name"])
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return killed


def small_cfg(tmp_path, *more):
    return load_config(DEMO, [f"run_dir={tmp_path / 'run'}", f"svf.cache_dir={tmp_path / 'factors'}",
                              f"registry.url={tmp_path / 'registry'}", *SMALL, *more])


@pytest.mark.parametrize("epochs,kl_every,schedule", [(1, 1, "constant"), (2, 2, "constant"), (2, 2, "linear")])
def test_one_rank_matches_train_local(cluster, tmp_path, epochs, kl_every, schedule):
    """Same seed, data, one actor and one learner rank: z equals the single-process oracle
    (also with two PPO-clipped updates per batch).  With ``rl.kl_every=2`` (beta 0) both compute
    the KL to the neutral model, a forward of its own, on step 2 only; z is unchanged by it.
    With ``rl.lr_schedule=linear`` both decay the lr by RL step (not by optimizer update)."""
    from t2dist.rl.local import train_local
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task
    from t2dist.orchestration.train import train

    cfg = small_cfg(tmp_path, "rollout.actors=1", "learner.ranks=1", "rl.steps=3", "train.checkpoint_every=3",
                    f"rl.update_epochs={epochs}", f"rl.kl_every={kl_every}", f"rl.lr_schedule={schedule}")
    train(cfg, progress=False)
    z_dist, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 3
    kl_steps = [1, 2, 3] if kl_every == 1 else [2]
    assert [h["step"] for h in state["history"] if "kl" in h] == kl_steps
    torch.set_num_threads(1)
    svf, tok = load_policy(cfg)
    local = train_local(cfg, HFEngine(cfg, policy=svf, tokenizer=tok), get_task("math"), progress=False)
    assert [h["step"] for h in local.history if "kl" in h] == kl_steps
    moved = max(float((local.z[n] - 1).abs().max()) for n in local.z)
    assert moved > 1e-3  # training really changed z
    for n in local.z:
        assert torch.allclose(z_dist[n], local.z[n].float(), atol=1e-5), n
    lrs = [h["lr"] for h in state["history"]]
    assert lrs == [h["lr"] for h in local.history]
    assert lrs == ([cfg.rl.lr] * 3 if schedule == "constant" else [cfg.rl.lr * (1 - s / 3) for s in range(3)])


def test_evaluator_killed_mid_evaluation_is_restarted_and_the_evaluation_redone(cluster):
    """Ray killing the evaluator (e.g. for memory pressure) while it evaluates no longer ends the run: the driver
    waits for the restart and asks again (a plain ``ray.get`` raised ActorUnavailableError here)."""
    from t2dist.orchestration.driver import Driver

    class SlowEvaluator:  # defined here: Ray's workers pickle it by value (they cannot import this module)
        """An evaluator stand-in whose ``evaluate`` takes a while, so it can be killed in the middle of one."""

        def __init__(self):
            self.calls = 0

        def ready(self):
            return True

        def evaluate(self, z, split, limit, tag):
            self.calls += 1  # a restarted actor counts from 0 again
            time.sleep(1.0)
            return {"accuracy": 0.5, "split": split, "limit": limit, "tag": tag, "calls": self.calls}

    driver = Driver.__new__(Driver)  # only the evaluator part: no model, no learners
    driver.cfg, driver.restarts, driver.actors = load_config(DEMO, ["train.max_actor_restarts=2"]), 0, []
    driver.evaluator = ray.remote(SlowEvaluator).options(max_restarts=2, max_task_retries=0).remote()
    ray.get(driver.evaluator.ready.remote())
    ref = driver.evaluator.evaluate.remote(None, "test", 40, None)
    time.sleep(0.3)
    ray.kill(driver.evaluator, no_restart=False)
    res = driver.evaluated(ref, None, "test", 40, None)
    assert res["split"] == "test" and res["limit"] == 40 and res["calls"] == 1  # redone on the restarted actor
    assert driver.restarts == 1


def test_run_outputs_tensorboard_and_actor_fault(cluster, tmp_path):
    """2 actors + 2 ranks; a rollout actor is killed mid-run, restarted, and its work redone."""
    from t2dist.orchestration.train import train

    cfg = small_cfg(tmp_path, "rl.steps=8", "train.eval_every=4", "train.checkpoint_every=4",
                    f"registry.url={tmp_path / 'registry'}")
    killed = kill_when_checkpointed(tmp_path / "run", "t2dist-rollout-1-", no_restart=False)
    summary = train(cfg, progress=False)
    assert killed, "the test never killed an actor"
    assert summary["actor_restarts"] >= 1
    assert summary["steps"] == 8
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "steps", "wall_seconds", "expert"):
        assert key in on_disk
    assert 0.0 <= on_disk["final_accuracy"] <= 1.0
    assert (Path(on_disk["expert"]) / "z.safetensors").is_file()

    # the evaluator published the best z with its metrics, config, fingerprint and curve; first champion
    from safetensors.torch import load_file

    from t2dist.registry import Registry

    reg = Registry(tmp_path / "registry")
    assert on_disk["published"]["ref"] == "math@1" and on_disk["published"]["promoted"]
    assert reg.aliases("math") == {"champion": 1}
    expert = reg.load("math:champion")
    card = expert.card
    assert card["metrics"]["test_accuracy"] == on_disk["final_accuracy"]
    assert card["metrics"]["best_val_accuracy"] == on_disk["best_val_accuracy"]
    assert card["config"]["rl"]["steps"] == 8 and card["base_fingerprint"]
    assert [e["step"] for e in card["training_curve"]["evals"]] == [4, 8]
    # how it was made: the command (here pytest's) and the machine, as the shipped experts' cards say
    assert card["command"] == command_line() and card["command"].startswith("python -m pytest")
    assert card["trained_on"] == machine_line("cpu") and cpu_name() in card["trained_on"]
    local = load_file(str(Path(on_disk["expert"]) / "z.safetensors"))
    assert all(torch.equal(local[k], expert.z[k]) for k in local)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == list(range(1, 9))  # no step lost

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/reward_mean", "train/reward_std", "train/accuracy", "train/kl", "train/loss",
                "train/entropy", "train/grad_norm", "train/response_length", "time/rollout_s", "time/learner_s",
                "time/tokens_per_s", "time/sync_s", "time/scoring_s", "sync/bytes_per_step", "eval/val_accuracy", "z/scale_mean"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/reward_mean")] == list(range(1, 9))
    assert "z/scales" in acc.Tags()["histograms"]
    # the HF engine's sampling log-probs are the learner's own up to float noise (other process, threads)
    assert "behaviour/abs_dlogp" in tags and "behaviour/kl" in tags
    assert max(e.value for e in acc.Scalars("behaviour/abs_dlogp")) < 1e-3
    sync = acc.Scalars("sync/bytes_per_step")[0].value
    n_z = 12 * 128  # 4 layers x 3 MLP matrices, full rank = min(128, 384)
    assert sync == 2 * n_z * 4  # two actors, float32 z: kilobytes, not the model


def test_learner_death_stops_with_resumable_checkpoint(cluster, tmp_path):
    from t2dist.orchestration.train import train

    cfg = small_cfg(tmp_path, "rl.steps=40", "train.checkpoint_every=2", "train.eval_every=100")
    kill_when_checkpointed(tmp_path / "run", "t2dist-learner-1-")
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "learner rank died" in msg and "--resume" in msg
    assert latest_checkpoint(tmp_path / "run") is not None


class SimulatedCrash(RuntimeError):
    pass


def test_crash_right_after_a_checkpoint_commit_keeps_the_best_z(cluster, tmp_path, monkeypatch):
    """A crash just after a checkpoint is renamed into place: resume still holds the best z (by validation)."""
    import t2dist.orchestration.checkpoint as ckpt_mod
    import t2dist.orchestration.train  # noqa: F401 (loaded, so that its names are patched too)
    from t2dist.orchestration.train import train

    real = ckpt_mod.commit_checkpoint

    def commit_then_crash(tmp, final, *args, **kw):
        path = real(tmp, final, *args, **kw)
        if final.name == "step-000002":
            raise SimulatedCrash("the driver dies right after committing step 2")
        return path

    for mod in list(sys.modules.values()):  # wherever the commit is reached from
        if getattr(mod, "__name__", "").startswith("t2dist") and getattr(mod, "commit_checkpoint", None) is real:
            monkeypatch.setattr(mod, "commit_checkpoint", commit_then_crash)
    cfg = small_cfg(tmp_path, "rollout.actors=1", "learner.ranks=1", "rl.steps=2", "train.eval_every=1",
                    "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.eval_limit=20", "eval.limit=20")
    with pytest.raises(SimulatedCrash):
        train(cfg, progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-000002"
    _, state = load_checkpoint(ckpt)
    best_step = state["best"]["step"]
    assert best_step in (1, 2)  # every validation result beats the initial -1
    z_at_best, _ = load_checkpoint(run / "checkpoints" / f"step-{best_step:06d}")
    assert (ckpt / "best_z.safetensors").is_file(), "the committed checkpoint lacks its best z"

    summary = train(cfg, resume=run, progress=False)
    assert summary["best_step"] == best_step
    from safetensors.torch import load_file

    expert = load_file(str(Path(summary["expert"]) / "z.safetensors"))
    for n in z_at_best:
        assert torch.equal(expert[n].float(), z_at_best[n].float()), n


def lagged_local_z(cfg):
    """Single-process oracle of rl.off_policy_steps=1: the batch of step s is sampled with z_(s-2) (z_0 for s<=2)."""
    from t2dist.rl.data import PromptStream
    from t2dist.rl.local import step_seed
    from t2dist.rl.rollout import engine_rollout
    from t2dist.rl.step import rl_loss
    from t2dist.policy.load import load_policy
    from t2dist.policy.zparams import ZParams
    from t2dist.tasks import get_task

    torch.set_num_threads(1)
    svf, tok = load_policy(cfg)
    engine = HFEngine(cfg, policy=svf, tokenizer=tok)
    rl, task = cfg.rl, get_task(cfg.task.name)
    torch.manual_seed(rl.seed)
    stream = PromptStream(task.examples("train"), rl.seed)
    zp = ZParams(svf.init_z(cfg.svf.init))
    opt = torch.optim.Adam(zp.parameters(), lr=rl.lr)
    zs = [zp.detached()]
    for i in range(rl.steps):  # step s = i + 1
        examples = stream.next_batch(rl.prompts_per_step)
        engine.set_z(zs[max(i - 1, 0)], version=max(i - 1, 0))
        batch = engine_rollout(engine, task, examples, samples_per_prompt=rl.samples_per_prompt,
                               temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=cfg.task.max_new_tokens,
                               seed=step_seed(rl.seed, i))
        opt.zero_grad(set_to_none=True)
        loss, _ = rl_loss(svf, zp.as_dict(), batch, rl, pad_id=tok.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(zp.parameters(), rl.clip_grad or float("inf"))
        opt.step()
        zs.append(zp.detached())
    engine.unset_z()
    return zs[-1]


def test_off_policy_step_matches_lagged_oracle_across_a_resume(cluster, tmp_path, monkeypatch):
    """rl.off_policy_steps=1, crashed right after the step-2 checkpoint (step 3's batch in flight) and resumed:
    z equals a single-process run whose batch s is sampled with z_(s-2), and differs from the on-policy oracle
    (rl.lr=0.1: at 0.02 the lag changed no sampled token in 3 steps, so the two oracles were equal)."""
    import t2dist.orchestration.checkpoint as ckpt_mod
    from t2dist.rl.local import train_local
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task
    from t2dist.orchestration.train import train

    cfg = small_cfg(tmp_path, "rollout.actors=1", "learner.ranks=1", "rl.steps=3", "rl.off_policy_steps=1", "rl.lr=0.1",
                    "train.checkpoint_every=2", "train.eval_every=100", "eval.limit=20", "train.eval_limit=20")
    real = ckpt_mod.commit_checkpoint

    def commit_then_crash(tmp, final, *args, **kw):
        path = real(tmp, final, *args, **kw)
        if final.name == "step-000002":
            raise SimulatedCrash("the driver dies with step 3's batch in flight")
        return path

    monkeypatch.setattr(ckpt_mod, "commit_checkpoint", commit_then_crash)
    with pytest.raises(SimulatedCrash):
        train(cfg, progress=False)
    monkeypatch.undo()
    assert (latest_checkpoint(tmp_path / "run") / "rollout_z.safetensors").is_file()
    train(cfg, resume=tmp_path / "run", progress=False)
    z_dist, state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 3 and state["position"] == 3 * 8
    z_lagged = lagged_local_z(cfg)
    for n in z_lagged:
        assert torch.allclose(z_dist[n], z_lagged[n].float(), atol=1e-5), n
    svf, tok = load_policy(cfg)
    on_policy = train_local(cfg, HFEngine(cfg, policy=svf, tokenizer=tok), get_task("math"), progress=False).z
    assert max(float((on_policy[n] - z_lagged[n]).abs().max()) for n in z_lagged) > 1e-4  # the lag is visible


@pytest.mark.parametrize("override,needle", [
    ("learner.ranks=3", "learner.ranks=3 must divide rl.prompts_per_step=8"),
    ("model.path=/no/such/model", "/no/such/model"),
    ("rollout.actors=500", "rollout.actors=500"),
    (f"registry.url={__file__}/registry", "cannot be written"),
    ("registry.name=bad/name", "registry.name"),
])
def test_bad_input_fails_before_any_actor(tmp_path, override, needle, monkeypatch):
    import t2dist.orchestration.train as driver

    def no_ray(cfg):
        raise AssertionError("Ray was contacted before the config was checked")

    monkeypatch.setattr(driver, "connect_ray", no_ray)
    cfg = small_cfg(tmp_path, override)
    with pytest.raises(Exception) as err:
        driver.train(cfg, progress=False)
    assert needle in str(err.value)


def test_more_resources_than_the_cluster_has(cluster, tmp_path):
    from t2dist.orchestration.train import check_resources

    cfg = small_cfg(tmp_path, "rollout.cpus_per_actor=8")
    with pytest.raises(TrainingError, match="needs 19 CPUs"):
        check_resources(cfg)


def _cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    return subprocess.Popen([sys.executable, "-m", "t2dist", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal, **kw)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_z(tmp_path):
    """A CLI run killed (SIGKILL) after step 6 of 12 and resumed ends with the z of an uninterrupted run."""
    common = ["--config", str(DEMO), "rl.steps=12", "train.checkpoint_every=6", "train.eval_every=6",
              f"svf.cache_dir={tmp_path / 'factors'}", f"registry.url={tmp_path / 'registry'}", "ray.address=local",
              *SMALL]
    full = _cli(["train", *common, f"run_dir={tmp_path / 'full'}", "--quiet"])
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    z_full, _ = load_checkpoint(latest_checkpoint(tmp_path / "full"))

    run = tmp_path / "killed"
    proc = _cli(["train", *common, f"run_dir={run}"])
    deadline = time.time() + 600
    while time.time() < deadline and latest_checkpoint(run) is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step-000006"
    assert not (run / "summary.json").exists()
    resumed = _cli(["train", "--resume", str(run), "--quiet"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    z_resumed, state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 12
    for n in z_full:
        assert torch.allclose(z_full[n], z_resumed[n], atol=1e-6), n


def test_ctrl_c_ends_a_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during `t2dist train`: exit 130, one line that
    names the last complete checkpoint and its step, no traceback; that checkpoint loads and resumes."""
    run = tmp_path / "run"
    proc = _cli(["train", "--config", str(DEMO), "rl.steps=400", "train.checkpoint_every=2", "train.eval_every=400",
                 "rollout.actors=1", "learner.ranks=1", "rl.prompts_per_step=4", "rl.samples_per_prompt=2",
                 "eval.limit=8", "train.eval_limit=8", f"svf.cache_dir={tmp_path / 'factors'}",
                 f"registry.url={tmp_path / 'registry'}", "ray.address=local", f"run_dir={run}"])
    deadline = time.time() + 600
    while time.time() < deadline and latest_checkpoint(run) is None and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in out and "KeyboardInterrupt" not in out, out
    ckpt = latest_checkpoint(run)
    z, state = load_checkpoint(ckpt)
    assert lines[0] == (f"[t2dist] interrupted: kept the checkpoint of step {state['step']}, {ckpt} "
                        f"(go on with: t2dist train --resume {run})")
    assert state["step"] >= 2 and z and not (run / "summary.json").exists()


@pytest.mark.parametrize("argv,want", [
    (["/venv/bin/t2dist", "train", "--config", "my run.yaml"], "t2dist train --config 'my run.yaml'"),
    (["/repo/t2dist/__main__.py", "train"], "t2dist train"),
    (["/venv/lib/python3.11/site-packages/pytest/__main__.py", "-q"], "python -m pytest -q"),
    (["bench/real_models.py", "--seeds", "0"], "bench/real_models.py --seeds 0"),
])
def test_a_card_names_the_command_as_it_was_typed(argv, want):
    assert command_line(argv) == want
