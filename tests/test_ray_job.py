"""`ray job submit --working-dir . -- t2dist train ...` against a `ray start --head` cluster on loopback.

Ray runs the job in a temporary copy of --working-dir that it deletes with its session, so a
run with relative output paths must refuse there, and with ``output_root`` put them under it
(issue 16).
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
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
        def submit(*overrides):
            # `ray start` returns before the node's job agent is up; under load the first submissions
            # are refused with "No available agent to submit job" (HTTP 500): the job never started.
            # Retry for up to 5 minutes (30 tries were not enough on 2 cores shared with a training run)
            deadline = time.monotonic() + 300
            while True:
                job = subprocess.run(
                    [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                     "--", "t2dist", "train", "--config", "configs/demo.yaml", "rl.steps=3", "rl.prompts_per_step=8",
                     "rl.samples_per_prompt=4", "eval.limit=40", "train.eval_limit=40", *overrides, "--quiet"],
                    env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
                if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                    return job
                time.sleep(2)

        # relative outputs would land in Ray's temporary copy of --working-dir: refused before any actor starts
        job = submit("run_dir=runs/lost", "registry.url=registry")
        out = job.stdout + job.stderr
        assert job.returncode != 0, out
        for needle in ("temporary copy of --working-dir", "run_dir", "registry.url", "svf.cache_dir", "output_root"):
            assert needle in out, needle
        assert "Ray cluster" not in out  # it stopped before connecting, so before any actor

        # with output_root, the same relative paths land under it and outlive the job
        home = tmp_path / "home"
        job = submit("run_dir=run", "registry.url=registry", f"output_root={home}")
        out = job.stdout + job.stderr
        assert job.returncode == 0, out
        assert "Ray cluster" in out and "succeeded" in out
        run_dir = home / "run"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and "final_accuracy" in summary
        assert Path(summary["expert"]) == run_dir / "expert" and (run_dir / "expert" / "z.safetensors").is_file()
        assert summary["published"]["registry"].startswith(str(home / "registry"))
        assert any((home / ".cache" / "t2dist" / "factors").iterdir())  # svf.cache_dir's default, relative
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
