"""Typed run state, per-step record, output paths (issue 16) and ``ray.address``: no cluster needed."""
import json

import pytest
import torch

from t2dist.config import ConfigError, load_config
from t2dist.rl.rollout import RolloutBatch
from t2dist.orchestration.run_state import Best, BestTracker, RunState, StepTimes, format_step, step_record, tb_scalars

# state.json as the untyped dict of earlier versions wrote it (keys and nesting)
OLD_STATE = {"step": 6, "position": 48, "best": {"accuracy": 0.55, "step": 4},
             "history": [{"step": 1, "reward": 0.25}], "evals": [{"step": 4, "accuracy": 0.55, "seconds": 1.0}],
             "base": {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 40}, "wall_seconds": 12.5,
             "rng": {"python": [3, [1, 2], None], "numpy": ["MT19937", [1], 0, 0, 0.0], "torch": [0, 1]}}


def test_old_state_json_reads_and_writes_back_unchanged():
    state = RunState.from_json(json.loads(json.dumps(OLD_STATE)))
    assert state.step == 6 and state.best == Best(accuracy=0.55, step=4) and state.base["n"] == 40
    assert state.to_json() == OLD_STATE
    state2 = RunState.from_json({**OLD_STATE, "later_key": [1]})  # a key this version does not know survives
    assert state2.to_json()["later_key"] == [1]


def test_best_tracker_keeps_the_earliest_of_equal_accuracies():
    state = RunState()
    z0, z1, z2, z3 = ({"a": torch.full((2,), float(i))} for i in range(4))
    best = BestTracker(state, z0)
    assert best.offer(1, 0.4, z1) and best.z is z1
    assert not best.offer(2, 0.4, z2) and best.z is z1  # ties keep the earlier step
    assert best.offer(3, 0.6, z3) and state.best == Best(0.6, 3)


def _batch(rewards, correct, lengths):  # 2 prompts x 2 samples
    return RolloutBatch(prompt_ids=[[1], [1]], completion_ids=[[2] * k for k in lengths],
                        rewards=torch.tensor(rewards).view(2, 2), correct=torch.tensor(correct).view(2, 2),
                        seconds={"generate": 1.5, "score": 0.25})


def test_tensorboard_scalars_derive_from_the_one_step_record():
    batch = _batch([1.0, 0.0, 1.0, 1.0], [True, False, True, True], [3, 5, 4, 4])
    rec = step_record(7, batch, {"loss": 0.5, "kl": 0.01, "grad_norm": 2.0, "note": "x", "step": 14},
                      StepTimes(sync_s=0.5, rollout_s=1.5, learner_s=2.0), sync_bytes=4096)
    # the learner's optimizer-step count (2 per RL step with rl.update_epochs=2) is not the record's step
    assert rec["optimizer_steps"] == 14
    assert rec["step"] == 7 and rec["reward"] == 0.75 and rec["accuracy"] == 0.75 and rec["response_length"] == 4.0
    assert rec["step_s"] == 4.0 and rec["tokens_per_s"] == 16 / 2.0 and "note" not in rec
    tb = tb_scalars(rec)
    assert tb["train/reward_mean"] == 0.75 and tb["train/kl"] == 0.01 and tb["sync/bytes_per_step"] == 4096
    assert tb["time/generate_s"] == 1.5 and tb["time/scoring_s"] == 0.25 and tb["train/entropy"] == 0.0
    assert not any(tag.startswith("behaviour/") for tag in tb)  # no engine log-probs: no mismatch scalars
    rec = step_record(7, batch, {"behaviour_abs_dlogp": 0.002, "behaviour_kl": 1e-6},
                      StepTimes(sync_s=0.5, rollout_s=1.5, learner_s=2.0), sync_bytes=0)
    tb = tb_scalars(rec)
    assert "train/kl" not in tb  # a step rl.kl_every skipped logs no KL (not a false 0)
    assert " kl       -  " in format_step(rec, 10)
    assert tb["behaviour/abs_dlogp"] == 0.002 and tb["behaviour/kl"] == 1e-6 and "behaviour/tis_weight" not in tb


# -- where outputs go (issue 16) -------------------------------------------------------------------
def _cfg(*more):
    return load_config(None, ["registry.url=registry", "svf.cache_dir=.cache/factors", *more])


def _in_ray_job(monkeypatch, tmp_path):
    """What Ray gives a job's driver: a cwd under working_dir_files and its runtime env in an env variable."""
    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}))
    return job_dir


def test_relative_outputs_inside_a_ray_job_are_refused(monkeypatch, tmp_path):
    from t2dist.orchestration.paths import resolve_outputs

    monkeypatch.delenv("T2DIST_HOME", raising=False)
    _in_ray_job(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_outputs(_cfg(), "runs/x")
    msg = str(err.value)
    for key in ("run_dir", "registry.url", "svf.cache_dir", "output_root", "T2DIST_HOME", "absolute", "s3://"):
        assert key in msg, key
    assert "model.cache_dir" not in msg  # null: ~/.cache/t2dist, persistent
    # absolute and remote paths are fine as they are
    cfg, run_dir = resolve_outputs(_cfg(f"registry.url=s3://b/reg", f"svf.cache_dir={tmp_path}/f"), tmp_path / "run")
    assert run_dir == tmp_path / "run" and cfg.registry.url == "s3://b/reg"


@pytest.mark.parametrize("how", ["config", "env"])
def test_relative_outputs_go_under_the_output_root(monkeypatch, tmp_path, how):
    from t2dist.orchestration.paths import resolve_outputs

    job_dir = _in_ray_job(monkeypatch, tmp_path)
    home = tmp_path / "home"
    more = [f"output_root={home}"] if how == "config" else []
    if how == "env":
        monkeypatch.setenv("T2DIST_HOME", str(home))
    cfg, run_dir = resolve_outputs(_cfg(*more, "model.cache_dir=models", "run_dir=runs/a"), "runs/a")
    assert run_dir == home / "runs/a" and cfg.run_dir == str(home / "runs/a")
    assert cfg.registry.url == str(home / "registry") and cfg.svf.cache_dir == str(home / ".cache/factors")
    assert cfg.model.cache_dir == str(home / "models")
    assert job_dir not in run_dir.parents
    with pytest.raises(ConfigError, match="output_root='rel' must be an absolute path"):
        resolve_outputs(_cfg("output_root=rel"), "r")


def test_outside_a_ray_job_relative_paths_stay_relative(monkeypatch, tmp_path):
    from t2dist.orchestration.paths import resolve_outputs

    monkeypatch.delenv("T2DIST_HOME", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg, run_dir = resolve_outputs(_cfg(), "runs/x")
    assert run_dir == __import__("pathlib").Path("runs/x") and cfg.registry.url == "registry"


# -- ray.address ------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting,env,expect", [
    (None, None, "local"), (None, "10.0.0.1:6379", "10.0.0.1:6379"), ("auto", "10.0.0.1:6379", "auto"),
    ("local", "10.0.0.1:6379", "local"), ("h:1", None, "h:1")])
def test_ray_address_follows_rays_convention(monkeypatch, setting, env, expect):
    from t2dist.orchestration.driver import ray_address

    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = load_config(None, [f"ray.address={setting}"] if setting else [])
    assert load_config(None).ray.address is None
    assert ray_address(cfg) == expect
