"""Shared by the serving tests: toy experts trained with ``t2dist train-local`` and published to a registry.

``train_toy_experts`` runs the project's own training command (in this process, through the CLI's
``main``) for three tiny experts of the toy base: ``math`` and ``code`` (few RL steps: they answer
differently from the base, which is what the serving tests need) and the classifier ``dispatch``
(the ``dispatch`` task, for ``serve.strategy=cls``), and publishes them to a fresh registry.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = {"math": "math", "code": "code", "dispatch": "dispatch"}  # name -> task
STEPS = 6


def train_toy_experts(root: Path) -> dict[str, str]:
    """``{"registry": dir, "factors": dir}`` with math@1, code@1, dispatch@1 published."""
    from t2dist.cli.main import main
    from t2dist.registry import Registry

    factors, reg_dir = root / "factors", root / "registry"
    reg = Registry(reg_dir, create=True)
    for name, task in EXPERTS.items():
        out = root / "trained" / name
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["train-local", "--model", "toy", "--task", task, "--steps", str(STEPS), "--out", str(out),
                       "--no-eval", "rl.prompts_per_step=8", "rl.lr=0.02", f"svf.cache_dir={factors}"])
        assert rc == 0, f"train-local {task} failed"
        reg.publish_dir(out, name=name)
    return {"registry": str(reg_dir), "factors": str(factors)}


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class ServerProcess:
    """``t2dist serve`` as a subprocess on a loopback port; ``stop()`` sends Ctrl-C and waits for its exit."""

    def __init__(self, args: list[str], port: int, log: Path, extra_env: dict | None = None):
        self.port, self.log_path = port, log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "t2dist", "serve", *args, f"serve.port={port}"],
                                     cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"t2dist serve exited ({self.proc.returncode}):\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"t2dist serve not ready after {timeout}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # leave nothing behind: the whole process group
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()
        return self.proc.returncode
