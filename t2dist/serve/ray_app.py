"""The Ray Serve application of ``t2dist serve``: the one module of the server that imports Ray.

Three deployments (``serve.*`` settings, never code):

* ``Ingress`` — the FastAPI app (``@serve.ingress``, built in the replica by
  ``__serve_build_asgi_app__`` around a :class:`~t2dist.serve.frontend.Frontend`); Ray Serve's HTTP
  proxy binds ``serve.host:serve.port``.  No model, only the tokenizer: 0 CPUs reserved.
* ``Experts`` — ``serve.replicas`` engine replicas (or ``serve.autoscaling``, passed to Ray Serve as
  its ``autoscaling_config``), each ``serve.cpus_per_replica`` / ``serve.gpus_per_replica``, each one
  :class:`~t2dist.serve.replica.EngineReplica`.  Requests carry their expert version (``NAME@V`` or
  ``base``) as Ray Serve's *multiplexed model id*: the z of an expert is loaded in a replica by the
  ``@serve.multiplexed`` method, and Ray Serve's router sends a model's requests to replicas that
  already hold it.  ``max_num_models_per_replica`` is ``serve.max_models_per_replica``, by default
  every served expert plus the base and the classifier: a z is kilobytes, so no replica ever
  needs to drop one, and the router still prefers replicas that served the expert (and so are
  likelier to hold its ``W'``); a smaller number makes replicas specialise in fewer experts.
* ``Dispatch`` — ``serve.dispatch_replicas`` engine replicas pinned to the first pass's weights
  (the base for ``prompt``, the classifier for ``cls``): the first pass of ``auto`` never switches
  the experts' engines.  With 0, the first pass runs on the ``Experts`` replicas (under the base's or
  the classifier's model id), which saves a model copy and costs switches.

A replica whose engine dies is replaced by Ray Serve (its health check raises, or its process is
gone); requests in flight on it get a 503 from the ingress.  :func:`run` starts or joins Ray
(``ray.address`` as ``t2dist train`` reads it: unset -> ``$RAY_ADDRESS`` (``ray job submit``) else a
local cluster; ``auto``; ``host:port``), deploys the app, and blocks until Ctrl-C.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from typing import AsyncIterator, Callable

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError

from t2dist.orchestration.driver import connect_ray
from t2dist.registry import Registry
from t2dist.serve.app import build_app as build_asgi_app
from t2dist.serve.errors import ServeError, queue_full, unavailable
from t2dist.serve.frontend import Frontend
from t2dist.serve.plan import ServePlan
from t2dist.serve.replica import EngineReplica
from t2dist.serve.resolver import BASE_ID

APP_NAME = "t2dist"
STOP_TIMEOUT_S = 60.0  # Ctrl-C: the longest wait for Serve's own teardown (see teardown)
RAY_STOP_TIMEOUT_S = 30.0  # then the longest wait for ray.shutdown() (together under ServerProcess.stop's 120 s)


def ray_error(exc: BaseException, limit: int) -> ServeError:
    """A Ray / Ray Serve failure as the error the client gets."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, BackPressureError):
        return queue_full(limit)
    return unavailable(f"an engine replica failed or went away ({type(exc).__name__}); retry the request")


class RayBackend:
    """The ingress's way to the engine replicas: Ray Serve deployment handles."""

    def __init__(self, experts, dispatch, max_queue: int):
        self.experts, self.dispatcher, self.max_queue = experts, dispatch, max_queue

    async def generate(self, model_id: str, spec: dict, *, dispatch: bool = False) -> dict:
        try:
            if dispatch and self.dispatcher is not None:
                return await self.dispatcher.generate.remote(model_id, spec)
            return await self.experts.options(multiplexed_model_id=model_id).generate.remote(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every Ray failure becomes an HTTP error
            return {"error": ray_error(exc, self.max_queue).to_dict()}

    async def health(self) -> dict:
        """Ray Serve's view of the app's deployments: status and replicas by state."""
        st = (await asyncio.to_thread(serve.status)).applications.get(APP_NAME)
        if st is None:
            return {}
        return {name: {"status": str(getattr(d.status, "value", d.status)),
                       "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
                for name, d in st.deployments.items()}

    async def stream(self, model_id: str, spec: dict) -> AsyncIterator[dict]:
        handle = self.experts.options(multiplexed_model_id=model_id, stream=True)
        try:
            async for ev in handle.stream.remote(spec):
                yield ev
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            yield {"error": ray_error(exc, self.max_queue).to_dict()}


def _replica_id(role: str) -> str:
    ctx = serve.get_replica_context()
    tag = getattr(ctx.replica_id, "unique_id", None) or str(ctx.replica_id)
    return f"{role}-{tag}-pid{os.getpid()}"


class ExpertsDeployment:
    """An engine replica serving every expert, reached under multiplexed model ids."""

    def __init__(self, plan: ServePlan, engine_name: str):
        self.core = EngineReplica(plan, engine_name, replica_id=_replica_id("experts"))

    async def _z(self, model_id: str):
        return await self.get_z(model_id)  # the @serve.multiplexed loader build_app adds (get_z below)

    async def generate(self, spec: dict) -> dict:
        model_id = serve.get_multiplexed_model_id() or BASE_ID
        try:
            z = await self._z(model_id)
        except ServeError as exc:
            return {"error": exc.to_dict(), "stats": self.core.stats()}
        return await self.core.generate(model_id, spec, z=z)

    async def stream(self, spec: dict) -> AsyncIterator[dict]:
        model_id = serve.get_multiplexed_model_id() or BASE_ID
        try:
            z = await self._z(model_id)
        except ServeError as exc:
            yield {"error": exc.to_dict(), "stats": self.core.stats()}
            return
        async for ev in self.core.stream(model_id, spec, z=z):
            yield ev

    async def info(self) -> dict:
        return self.core.info()

    def check_health(self) -> None:
        self.core.check_health()


async def get_z(self, model_id: str):
    """Ray Serve's multiplexed loader of :class:`ExpertsDeployment`: the verified z of ``model_id``.

    (Ray Serve finds the method by this function's name, so it is named as the attribute it becomes.)"""
    return await asyncio.to_thread(self.core.load, model_id)


class DispatchDeployment:
    """An engine replica pinned to the first pass's weights (never switches)."""

    def __init__(self, plan: ServePlan, engine_name: str, model_id: str):
        self.core = EngineReplica(plan, engine_name, replica_id=_replica_id("dispatch"), pinned=model_id)

    async def generate(self, model_id: str, spec: dict) -> dict:
        return await self.core.generate(model_id, spec)

    def check_health(self) -> None:
        self.core.check_health()


class IngressDeployment:
    def __init__(self, plan: ServePlan, experts, dispatch, api_key_digest: bytes | None):
        backend = RayBackend(experts, dispatch, plan.serve.max_queue)
        self.front = Frontend(plan, backend, api_key_digest=api_key_digest)

    def __serve_build_asgi_app__(self):
        return build_asgi_app(self.front)


def models_per_replica(plan: ServePlan) -> int:
    s = plan.serve
    return s.max_models_per_replica or (len(plan.experts) + 2 + (1 if plan.cls_expert else 0))


def build_app(plan: ServePlan, engine_name: str, api_key_digest: bytes | None = None):
    """The bound application (deployments configured from ``serve.*``)."""
    s = plan.serve
    actor = {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica}
    ongoing = s.max_queue + s.max_batch_size  # let requests reach the replica's own scheduler (it batches them)
    experts_cls = type("Experts", (ExpertsDeployment,), {
        "get_z": serve.multiplexed(max_num_models_per_replica=models_per_replica(plan))(get_z)})
    scale = {"autoscaling_config": s.autoscaling} if s.autoscaling else {"num_replicas": s.replicas}
    experts = serve.deployment(experts_cls, name="Experts", ray_actor_options=actor, max_ongoing_requests=ongoing,
                               health_check_period_s=5, graceful_shutdown_timeout_s=5, **scale)
    dispatch_app = None
    if s.dispatch_replicas > 0:
        pinned = BASE_ID if s.strategy == "prompt" else _cls_model_id(plan)
        dispatch = serve.deployment(DispatchDeployment, name="Dispatch", ray_actor_options=actor,
                                    num_replicas=s.dispatch_replicas, max_ongoing_requests=ongoing,
                                    health_check_period_s=5, graceful_shutdown_timeout_s=5)
        dispatch_app = dispatch.bind(plan, engine_name, pinned)
    ingress = serve.deployment(serve.ingress()(IngressDeployment), name="Ingress",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * ongoing)
    return ingress.bind(plan, experts.bind(plan, engine_name), dispatch_app, api_key_digest)


def _cls_model_id(plan: ServePlan) -> str:
    """The classifier's version now (the dispatch replicas are pinned to it; a new one needs a restart)."""
    name, version = Registry(plan.registry_url, plan.storage_options).resolve(plan.cls_expert)
    return f"{name}@{version}"


def connect(cfg) -> str:
    """Start or join Ray (module docstring; :func:`t2dist.orchestration.driver.connect_ray`), a local one sized
    for the replicas; returns how."""
    s = cfg.serve
    replicas = s.replicas + s.dispatch_replicas
    return connect_ray(cfg, need={"CPU": replicas * s.cpus_per_replica, "GPU": replicas * s.gpus_per_replica},
                       error=lambda message: ServeError(message, status=500, code="bad_config"))


def run(plan: ServePlan, engine_name: str, api_key: str | None, say: Callable[[str], None] = print,
        stop: threading.Event | None = None) -> bool:
    """Deploy the app on Ray Serve and block until Ctrl-C / SIGTERM (or ``stop`` is set).

    Both signals only set ``stop`` (rather than a KeyboardInterrupt raised wherever the main thread happens to
    be); the handlers in place before are back before the teardown, so a second Ctrl-C interrupts its waits. Returns :func:`teardown`'s answer: False when Ray did
    not stop in time (the caller then exits without waiting for it again).
    """
    cfg = plan.cfg
    s = cfg.serve
    how = connect(cfg)
    owns = how == "local"
    digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
    stop = stop or threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": s.host, "port": s.port})
        t0 = time.perf_counter()
        serve.run(build_app(plan, engine_name, digest), name=APP_NAME, route_prefix="/", blocking=False,
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
        say(f"serving on http://{s.host}:{s.port}/v1 (OpenAI API; Ray {how}, {time.perf_counter() - t0:.0f}s to "
            f"deploy{', API key required' if api_key else ''}); Ctrl-C stops")
        while not stop.is_set():
            stop.wait(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        why = signal.Signals(received[0]).name if received else "stop set" if stop.is_set() else "an error"
        say(f"stopping ({why}): deleting the app" + (", then Ray Serve and Ray" if owns else ""))
        clean = teardown(owns, say)
    say("stopped")
    return clean


def teardown(owns: bool, say: Callable[[str], None] = print, timeout_s: float = STOP_TIMEOUT_S,
             ray_timeout_s: float = RAY_STOP_TIMEOUT_S) -> bool:
    """Delete the app (and Serve, when this process started Ray), then stop Ray when ours; every wait bounded.

    Serve's own teardown waits for every replica; one being replaced when Ctrl-C came (a killed engine) can
    hold it for minutes. After ``timeout_s`` the wait ends: Ray, when this process owns it, stops anyway
    (which ends every replica); on a cluster of someone else's, the app may still be deleting in the background.
    ``ray.shutdown()`` gets ``ray_timeout_s``; returns False when it did not finish (Ray's processes share this
    process's fate and end with it). A failed Serve teardown re-raises, after Ray stopped.
    """
    def stop_serve() -> None:
        serve.delete(APP_NAME)
        if owns:
            serve.shutdown()

    done, failed = _within(stop_serve, timeout_s, "t2dist-serve-teardown")
    if not done:
        say(f"Ray Serve did not stop within {timeout_s:.0f}s" + ("; stopping Ray" if owns else "; leaving it"))
    clean = True
    if owns:
        ray_done, ray_failed = _within(ray.shutdown, ray_timeout_s, "t2dist-ray-shutdown")
        if not ray_done:
            say(f"Ray did not stop within {ray_timeout_s:.0f}s; its processes end with this one")
        elif ray_failed is not None:
            say(f"ray.shutdown() failed: {ray_failed!r}; Ray's processes end with this one")
        clean = ray_done and ray_failed is None
    if failed is not None:
        raise failed
    return clean


def _within(fn: Callable[[], None], timeout_s: float, name: str) -> tuple[bool, BaseException | None]:
    """Call ``fn`` in a daemon thread and wait at most ``timeout_s``: ``(finished, what it raised)``."""
    failed: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    finished = done.wait(timeout_s)
    return finished, (failed[0] if finished and failed else None)
