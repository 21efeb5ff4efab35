"""``t2dist serve`` as a child process on a loopback port: what the serving tests and bench/serve.py run.

``ServerProcess(args, port, log)`` starts ``python -m t2dist serve ARGS serve.port=PORT`` in its own
session (offline: ``HF_HUB_OFFLINE``), with its output in ``log``; ``wait_ready`` polls ``/health``;
``stop`` sends Ctrl-C (SIGINT) and waits for the clean exit, and kills the whole process group (the
server's local Ray cluster with it) only if it does not exit in time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class ServerProcess:
    """``t2dist serve`` as a subprocess on a loopback port; ``stop()`` sends Ctrl-C and waits for its exit."""

    def __init__(self, args: list[str], port: int, log: Path, extra_env: dict | None = None):
        self.port, self.log_path = port, log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "t2dist", "serve", *args, f"serve.port={port}"],
                                     env={**env(), **(extra_env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
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
