"""One serving replica without Ray: an engine, the z of the experts it serves, the batching scheduler.

The Ray Serve deployment (``t2dist/serve/ray_app.py``) wraps one of these per replica process; the
tests and the in-process backend use it directly.  The engine is one of the rollout engines
(``serve.engine``: the HF shared-prefix sampler or vLLM) built from the plan's config; it starts at
the base weights.  An expert's z (kilobytes) is read from the registry on first use, sha256-checked
(``Registry.load``) and checked against the engine's policy (``check_compatible``); a corrupt or
incompatible expert is refused with an error naming it, and every other model keeps serving.

A request (``spec``, a plain dict from the ingress: prompt token ids, ``n``, sampling parameters,
``label_categories`` for a first pass) becomes a :class:`~t2dist.engines.requests.GenRequest` queued
on the scheduler under its model id.  The engine call of a group switches the engine's weights
when the group needs other ones (``set_z`` / ``unset_z``: one switch counted) and answers the group
with ``engine.generate_requests``.  Every answer carries the replica's counters
(:meth:`EngineReplica.stats`), which the ingress turns into app-wide metrics.

A *pinned* replica (the dispatch deployment) holds one model's weights from the start and serves
only that model: the first pass never switches.  With ``serve.mode: lora`` the engine is vLLM with
``enable_lora`` and an expert's "z" is its LoRA adapter (:mod:`t2dist.serve.adapters`): every request
carries its own, all of them batch together, nothing switches.
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator, Mapping

import torch

from t2dist.engines import make_engine
from t2dist.engines.base import EngineDied
from t2dist.engines.requests import GenRequest
from t2dist.experts.expert import ExpertError, check_compatible
from t2dist.registry import Registry, RegistryError
from t2dist.serve.adapters import Adapters, lora_options
from t2dist.serve.dispatch import label_decided
from t2dist.serve.errors import ServeError, expert_corrupt, internal, not_found, unavailable
from t2dist.serve.plan import ServePlan
from t2dist.serve.resolver import BASE_ID
from t2dist.serve.scheduler import BatchScheduler

log = logging.getLogger(__name__)
LORA_GROUP = "lora"  # serve.mode=lora: the scheduler's one group (no weights to switch)
_CORRUPT = ("sha256", "bytes but the card", "has no z.safetensors", "cannot be read", "damaged")


class EngineReplica:
    """See the module docstring.  ``engine_name``: hf | vllm; ``pinned``: the one model id it serves."""

    def __init__(self, plan: ServePlan, engine_name: str, *, replica_id: str | None = None,
                 pinned: str | None = None, engine=None):
        cfg = plan.cfg
        s = cfg.serve
        self.plan, self.engine_name, self.pinned = plan, engine_name, pinned
        self.replica_id = replica_id or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if s.threads_per_replica and engine is None:
            torch.set_num_threads(s.threads_per_replica)
        self.lora = s.mode == "lora"  # every expert a LoRA adapter in vLLM (t2dist/serve/adapters.py): no switches
        extra = {}
        if self.lora:
            extra["lora"] = lora_options(plan)
        self.engine = engine if engine is not None else make_engine(cfg, engine_name, batch_size=s.max_batch_size,
                                                                    **extra)
        if self.engine.policy.fingerprint != plan.fingerprint:
            raise internal(f"replica: the base model loaded here (fingerprint {self.engine.policy.fingerprint}) is "
                           f"not the one planned ({plan.fingerprint}); do all nodes see the same model.path?")
        self.switches = 0
        self._registry = None
        self._z: OrderedDict[str, Mapping] = OrderedDict()
        self._z_limit = s.max_models_per_replica or 10**6
        self.scheduler = BatchScheduler(self._run, self.held, window_s=s.batch_window_ms / 1000,
                                        max_batch=s.max_batch_size, max_queue=s.max_queue)
        self.adapters = None
        if self.lora:
            self.adapters = Adapters(plan, self.engine.policy)
        if pinned is not None and pinned != BASE_ID and not self.lora:
            z = self.load(pinned)
            self.engine.set_z(z, pinned)  # held from the start: not a switch
            self._z[pinned] = z

    # -- weights ------------------------------------------------------------------------------
    def held(self) -> str:
        if self.lora:
            return LORA_GROUP
        v = self.engine.version
        return BASE_ID if v is None else str(v)

    def _run(self, model_id: str, z: Mapping | None, requests) -> list:
        if self.held() != model_id:
            if model_id == BASE_ID:
                self.engine.unset_z()
            else:
                self.engine.set_z(z, model_id)
            self.switches += 1
        return self.engine.generate_requests(requests)

    @property
    def registry(self):
        if self._registry is None:
            if not self.plan.registry_url:
                raise not_found("no registry (registry.url) is set")
            self._registry = Registry(self.plan.registry_url, self.plan.storage_options)
        return self._registry

    def load(self, model_id: str) -> Mapping | None:
        """The z of ``model_id`` (``NAME@V``) from the registry, verified (None for the base)."""
        if model_id == BASE_ID:
            return self.adapters.base() if self.adapters is not None else None
        try:
            expert = self.registry.load(model_id)
            check_compatible(expert, self.engine.policy, source=f"expert {model_id}")
        except RegistryError as exc:
            if any(k in str(exc) for k in _CORRUPT):
                raise expert_corrupt(f"expert {model_id} is refused: {exc}") from None
            raise not_found(f"expert {model_id}: {exc}") from None
        except ExpertError as exc:
            raise not_found(f"expert {model_id} cannot be served by this engine: {exc}") from None
        if self.adapters is not None:
            return self.adapters.adapter(model_id, expert)
        device = next(self.engine.policy.model.parameters()).device
        return {k: v.to(device) for k, v in expert.z.items()}

    def expert_z(self, model_id: str) -> Mapping | None:
        """:meth:`load` with a small LRU (the in-process backend; Ray Serve's multiplexing caches otherwise)."""
        if model_id == BASE_ID and not self.lora:
            return None
        if model_id in self._z:
            self._z.move_to_end(model_id)
            return self._z[model_id]
        z = self.load(model_id)
        self._z[model_id] = z
        while len(self._z) > self._z_limit:
            self._z.popitem(last=False)
        return z

    # -- requests -----------------------------------------------------------------------------
    def _request(self, spec: Mapping[str, Any], on_text=None, adapter=None) -> GenRequest:
        cats = spec.get("label_categories")
        return GenRequest(list(spec["prompt_ids"]), n=int(spec.get("n", 1)),
                          temperature=float(spec.get("temperature", 0.0)), top_p=float(spec.get("top_p", 1.0)),
                          max_new_tokens=int(spec["max_tokens"]), stop=tuple(spec.get("stop") or ()),
                          seed=spec.get("seed"), stop_when=label_decided(cats) if cats else None, on_text=on_text,
                          adapter=adapter)

    def _check_model(self, model_id: str) -> None:
        if self.pinned is not None and model_id != self.pinned:
            raise internal(f"this replica serves only {self.pinned}, not {model_id}")

    async def _submit(self, model_id: str, spec, z, on_text=None):
        self._check_model(model_id)
        if z is None and (model_id != BASE_ID or self.lora):
            z = await asyncio.to_thread(self.expert_z, model_id)
        if self.lora:  # one group for all: each request carries its adapter
            return self.scheduler.submit(LORA_GROUP, None, self._request(spec, on_text, adapter=z))
        return self.scheduler.submit(model_id, z, self._request(spec, on_text))

    def _result(self, job, comps) -> dict[str, Any]:
        return {"choices": [{"text": c.text, "finish_reason": c.stop_reason, "tokens": len(c.completion_ids)}
                            for c in comps], **job.timing(), "stats": self.stats()}

    async def generate(self, model_id: str, spec: Mapping[str, Any], z: Mapping | None = None) -> dict[str, Any]:
        """Answer one request: ``{"choices": [...], "queue_s", "engine_s", "stats"}`` or ``{"error": {...}}``."""
        try:
            job = await self._submit(model_id, spec, z)
            try:
                comps = await job.future
            except asyncio.CancelledError:
                job.cancel.set()
                raise
            return self._result(job, comps)
        except ServeError as exc:
            return {"error": exc.to_dict(), "stats": self.stats()}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine failed: say so, the replica may be replaced
            log.exception("engine call failed")
            return {"error": unavailable(f"the engine failed: {type(exc).__name__}: {exc}").to_dict(),
                    "stats": self.stats()}

    async def stream(self, model_id: str, spec: Mapping[str, Any], z: Mapping | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Answer one request as events: ``{"delta": [sample, text]}`` ..., then the :meth:`generate` dict."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(sample: int, text: str) -> None:  # called in the engine's worker thread
            loop.call_soon_threadsafe(events.put_nowait, {"delta": [sample, text]})

        try:
            job = await self._submit(model_id, spec, z, on_text)
        except ServeError as exc:
            yield {"error": exc.to_dict(), "stats": self.stats()}
            return
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                break
            exc = job.future.exception()
            if exc is not None:
                err = exc if isinstance(exc, ServeError) else unavailable(f"the engine failed: {exc}")
                yield {"error": err.to_dict(), "stats": self.stats()}
                return
            yield self._result(job, job.future.result())
        finally:
            job.cancel.set()  # the client went away (or we are done): stop its rows at the next step

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "engine": self.engine_name, "held": self.held(),
                "switches": self.switches, **self.scheduler.stats()}

    def info(self) -> dict[str, Any]:
        return {"fingerprint": self.engine.policy.fingerprint, "engine": self.engine_name, **self.stats()}

    def check_health(self) -> None:
        """Raises when the engine cannot answer any more (Ray Serve then replaces the replica)."""
        llm = getattr(self.engine, "llm", "no-llm")
        if llm is None:
            raise EngineDied("the vLLM engine was closed")

    async def close(self) -> None:
        await self.scheduler.close()
        self.engine.close()
