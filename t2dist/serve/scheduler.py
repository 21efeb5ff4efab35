"""The batching scheduler of one replica: requests grouped by expert, one engine call per group.

An engine holds one set of weights at a time; switching experts recomposes ``W'`` from z (on
SmolLM2: ~0.2 s for 90 MLP matrices on an AVX512 CPU in vLLM's worker, ~0.9 s on an AVX2 one).  So
the scheduler gathers the requests that arrive within ``serve.batch_window_ms``, groups them by the
weights they need (the multiplexed model id: ``base`` or ``NAME@V``) and answers them in *rounds*:
each waiting group once per round, the group of the weights the engine already holds first, the
others by their oldest request.  A round pays at most one switch per expert however the requests
interleave, and a request waits at most one round (the expert it needs cannot be starved by a busy
one).  A group larger than ``serve.max_batch_size`` sequences (requests x ``n``) runs as several
calls.  Requests that arrive during a round wait for the next one.

Each engine call runs in a worker thread, so the event loop keeps accepting (and refusing)
requests meanwhile; calls never overlap (one engine, one thread at a time).  More than
``serve.max_queue`` waiting requests is a 429 (:func:`t2dist.serve.errors.queue_full`), raised at
submission, before any work.  Counters (requests, batches, engine seconds) and the queue depth are
in :meth:`BatchScheduler.stats`; the replica reports them with every answer.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from t2dist.engines.requests import GenRequest
from t2dist.serve.errors import queue_full

RunGroup = Callable[[str, Any, Sequence[GenRequest]], list]


class Job:
    """One request waiting for (or in) an engine call."""

    def __init__(self, model_id: str, z: Mapping | None, request: GenRequest, future: asyncio.Future):
        self.model_id, self.z, self.request, self.future = model_id, z, request, future
        self.arrived = time.perf_counter()
        self.started: float | None = None
        self.finished: float | None = None
        self.cancel = threading.Event()
        if request.is_cancelled is None:
            request.is_cancelled = self.cancel.is_set

    @property
    def sequences(self) -> int:
        return self.request.n

    def timing(self) -> dict[str, float]:
        """Seconds this request waited and spent in its engine call."""
        start = self.started or self.arrived
        return {"queue_s": start - self.arrived, "engine_s": (self.finished or start) - start}


class BatchScheduler:
    """See the module docstring.  ``run(model_id, z, requests)`` is the engine call (in a worker thread),
    ``held()`` the model id whose weights the engine holds now."""

    def __init__(self, run: RunGroup, held: Callable[[], str], *, window_s: float = 0.01, max_batch: int = 32,
                 max_queue: int = 256):
        self.run, self.held = run, held
        self.window_s, self.max_batch, self.max_queue = window_s, max_batch, max_queue
        self._waiting: list[Job] = []
        self._round_left = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.requests = self.batches = self.rounds = self.rejected = 0
        self.engine_s = 0.0

    @property
    def depth(self) -> int:
        """Requests waiting for an engine call (not counting the call running now)."""
        return len(self._waiting) + self._round_left

    def submit(self, model_id: str, z: Mapping | None, request: GenRequest) -> Job:
        """Queue one request (a 429 :class:`~t2dist.serve.errors.ServeError` when the queue is full)."""
        if self.depth >= self.max_queue:
            self.rejected += 1
            raise queue_full(self.max_queue)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="t2dist-serve-scheduler")
        job = Job(model_id, z, request, loop.create_future())
        self._waiting.append(job)
        self.requests += 1
        self._wake.set()
        return job

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if self.window_s > 0:
                await asyncio.sleep(self.window_s)
            jobs, self._waiting = self._waiting, []
            self._wake.clear()
            if jobs:
                await self._round(jobs)

    def plan_round(self, jobs: Sequence[Job]) -> list[tuple[str, list[Job]]]:
        """The engine calls of one round, in order: ``(model id, jobs)`` (module docstring)."""
        groups: dict[str, list[Job]] = {}
        for j in sorted(jobs, key=lambda j: j.arrived):
            groups.setdefault(j.model_id, []).append(j)
        held = self.held()
        order = sorted(groups, key=lambda m: (m != held, groups[m][0].arrived))
        calls = []
        for m in order:
            chunk: list[Job] = []
            for j in groups[m]:
                if chunk and sum(x.sequences for x in chunk) + j.sequences > self.max_batch:
                    calls.append((m, chunk))
                    chunk = []
                chunk.append(j)
            calls.append((m, chunk))
        return calls

    async def _round(self, jobs: list[Job]) -> None:
        self.rounds += 1
        calls = self.plan_round(jobs)
        self._round_left = len(jobs)
        for model_id, chunk in calls:
            self._round_left -= len(chunk)
            live = [j for j in chunk if not j.cancel.is_set() and not j.future.done()]
            if live:
                await self._call(model_id, live)

    async def _call(self, model_id: str, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        for j in jobs:
            j.started = t0
        try:
            results = await asyncio.to_thread(self.run, model_id, jobs[0].z, [j.request for j in jobs])
        except Exception as exc:  # noqa: BLE001 - the callers get the engine's error
            for j in jobs:
                j.finished = time.perf_counter()
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        t1 = time.perf_counter()
        self.batches += 1
        self.engine_s += t1 - t0
        for j, r in zip(jobs, results):
            j.finished = t1
            if not j.future.done():
                j.future.set_result(r)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "rounds": self.rounds, "rejected": self.rejected,
                "engine_s": self.engine_s, "queue_depth": self.depth}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._task = None
