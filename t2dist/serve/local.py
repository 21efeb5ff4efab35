"""The server in one process, without Ray: the same app, replicas called directly.

For tests and for debugging the server's logic: :class:`LocalBackend` hands the ingress's calls to
in-process :class:`~t2dist.serve.replica.EngineReplica` s (one for the experts, optionally one
pinned to the first pass's weights), and :func:`serve_in_thread` runs the FastAPI app under uvicorn
on a loopback port in a background thread.  ``t2dist serve`` itself always runs on Ray Serve
(``t2dist/serve/ray_app.py``).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import AsyncIterator

import uvicorn

from t2dist.serve.replica import EngineReplica


class LocalBackend:
    def __init__(self, replica: EngineReplica, dispatch: EngineReplica | None = None):
        self.replica, self.dispatcher = replica, dispatch

    async def generate(self, model_id: str, spec: dict, *, dispatch: bool = False) -> dict:
        r = self.dispatcher if dispatch and self.dispatcher is not None else self.replica
        return await r.generate(model_id, spec)

    def stream(self, model_id: str, spec: dict) -> AsyncIterator[dict]:
        return self.replica.stream(model_id, spec)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ThreadedServer:
    """A uvicorn server in a daemon thread (``stop()`` ends it and waits)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="t2dist-serve-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ThreadedServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None) -> ThreadedServer:
    return ThreadedServer(app, host, port).start()
