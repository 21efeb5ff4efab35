"""The `t2dist` command line: help, the single-process RL oracle's gains, eval, expert show, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from child_processes import sigint_as_in_a_terminal

ROOT = Path(__file__).resolve().parent.parent


def t2dist(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2dist", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_help_lists_every_command():
    from t2dist.cli.main import COMMANDS

    out = t2dist("--help").stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.slow  # 80 steps of the demo + 3 evaluations of 400 problems each: minutes per task on 2 cores
@pytest.mark.parametrize("task", ["math", "code"])
def test_train_local_gains_15_points(task, tmp_path):
    """The acceptance bar: each expert gains >= 15 points on its own test split (default demo settings)."""
    out = tmp_path / f"{task}-expert"
    res = tmp_path / f"{task}.json"
    t2dist("train-local", "--config", "configs/demo.yaml", "--task", task, "--out", out, "--json", res,
           f"svf.cache_dir={tmp_path / 'factors'}")
    result = json.loads(res.read_text())
    assert result["base"]["n"] == 400 and result["final"]["n"] == 400
    assert result["gain"] >= 0.15, result
    # the saved expert reproduces its accuracy through `t2dist eval`
    ev = tmp_path / "eval.json"
    t2dist("eval", "--expert", out, "--task", task, "--split", "test", "--json", ev,
           f"svf.cache_dir={tmp_path / 'factors'}")
    evaluated = json.loads(ev.read_text())
    assert evaluated["accuracy"] == pytest.approx(result["final"]["accuracy"])
    assert evaluated["ci_low"] <= evaluated["accuracy"] <= evaluated["ci_high"]
    show = t2dist("expert", "show", out).stdout
    assert f'"task": "{task}"' in show and "scale_mean" in show


@pytest.mark.parametrize("args,needle", [
    (["eval", "--task", "math", "model.path=/no/such/dir"], "model path /no/such/dir does not exist"),
    (["eval", "--task", "chess"], "unknown task 'chess'"),
    (["eval", "--task", "math", "--expert", "/no/expert"], "expert /no/expert does not exist"),
    (["train-local", "--task", "math", "--out", "/tmp/x", "svf.targets=mpl"], "svf.targets='mpl' matched no linear layer"),
    (["train-local", "--task", "math", "--out", "/tmp/x", "rl.lr_rate=1"], "rl.lr_rate"),
    (["train", "--config", "configs/demo.yaml", "learner.ranks=3"], "learner.ranks=3 must divide"),
])
def test_bad_input_is_one_clear_line(args, needle):
    proc = t2dist(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_ends_train_local_with_one_line(tmp_path):
    """Ctrl-C during train-local's steps: exit 130 and one line saying nothing was kept (no traceback, no expert)."""
    import signal
    import threading
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "t2dist", "train-local", "--config", "configs/demo.yaml",
                             "--out", str(tmp_path / "expert"), "--no-eval", "rl.steps=5000",
                             f"svf.cache_dir={tmp_path / 'factors'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and not any("train-local math:" in s and "1/5000" in s for s in seen):
        time.sleep(0.2)  # the progress bar has counted a step: we are inside the training loop
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(seen)
    assert proc.returncode == 130, out
    lines = [line for line in out.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith("[t2dist] interrupted: train-local stopped after "), out
    assert "nothing kept" in lines[0] and "Traceback" not in out and not (tmp_path / "expert").exists()
