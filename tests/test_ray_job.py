"""`ray job submit --working-dir . -- t2dist train ...` against a `ray start --head` cluster on loopback."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_driver_on_a_head_node(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=6",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        run_dir = tmp_path / "run"
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
             "--", "t2dist", "train", "--config", "configs/demo.yaml", "rl.steps=3", "rl.prompts_per_step=8",
             "rl.samples_per_prompt=4", "eval.limit=40", "train.eval_limit=40", f"run_dir={run_dir}",
             f"svf.cache_dir={tmp_path / 'factors'}", f"registry.url={tmp_path / 'registry'}", "--quiet"],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out
        assert "Ray cluster" in out and "succeeded" in out
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and "final_accuracy" in summary
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
