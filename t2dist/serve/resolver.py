"""From a request's ``model`` to what answers it: the base, one expert version, or ``auto``.

``model`` is one of the base's names (``base``, ``model.path``: ``smollm2``, ``toy``...), ``auto``,
or an expert reference ``NAME``, ``NAME@VERSION``, ``NAME:ALIAS`` of a served name (see
:mod:`t2dist.serve.plan`).  A reference resolves to one immutable version ``NAME@V``, which is the
multiplexed model id the replicas load and switch to; the base's id is ``base``.

Live registry, short cache: the version a reference names (an alias, the latest version) is read
from the registry and kept for ``serve.resolve_ttl_s`` seconds (default 5), so a newly published
version or a moved alias is answered within that time without a restart, while a busy server does
not list the registry on every request.  With ``serve.experts: null`` the served names are re-listed
on the same schedule.  Cards of versions are immutable and kept; each is checked once against the
base (fingerprint) and the engine's policy setup, so a version trained elsewhere is a 404 that says
why.  Registry I/O is blocking (fsspec): the ingress calls this from a worker thread.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from t2dist.registry import Registry, RegistryError
from t2dist.registry.store import ExpertRef
from t2dist.serve.errors import ServeError, not_found
from t2dist.serve.plan import ServePlan, card_problem, category

BASE_ID = "base"


@dataclass(frozen=True)
class Target:
    """What answers a request: ``kind`` base | expert | auto; ``model_id``: ``base`` or ``NAME@V``."""

    kind: str
    model_id: str
    name: str | None = None  # the expert's name
    category: str | None = None

    @property
    def expert(self) -> str:
        """What the response names as the answering expert (``base`` for the base)."""
        return self.model_id


BASE = Target("base", BASE_ID)
AUTO = Target("auto", "auto")


class ExpertResolver:
    """Model names to :class:`Target` s, with the short-lived cache of the module docstring."""

    def __init__(self, plan: ServePlan, registry=None, clock: Callable[[], float] = time.monotonic):
        self.plan, self.clock = plan, clock
        self.ttl = plan.serve.resolve_ttl_s
        self.registry = registry
        if self.registry is None and plan.registry_url:
            self.registry = Registry(plan.registry_url, plan.storage_options)
        self.cfg = plan.cfg
        self._lock = threading.Lock()
        self._refs: dict[str, tuple[float, str, int]] = {}
        self._cards: dict[tuple[str, int], dict | str] = {}  # card, or why it cannot be served
        self._names: tuple[float, dict[str, str], dict[str, str | None]] = (
            clock() + self.ttl, dict(plan.experts), dict(plan.categories))

    # -- served names --------------------------------------------------------------------------
    def served(self) -> tuple[dict[str, str], dict[str, str | None]]:
        """``({name: default reference}, {name: category})`` of the experts served now."""
        expires, refs, cats = self._names
        if self.plan.dynamic and self.registry is not None and self.clock() >= expires:
            refs, cats = self._list_names()
            self._names = (self.clock() + self.ttl, refs, cats)
        return refs, cats

    def _list_names(self) -> tuple[dict[str, str], dict[str, str | None]]:
        refs, cats = {}, {}
        for name in self.registry.names():
            try:
                _, version = self._version(name)
            except (RegistryError, ServeError):
                continue
            card = self._card(name, version)
            if isinstance(card, dict):
                refs[name], cats[name] = name, category(card)
        return refs, cats

    def routes(self) -> dict[str, str]:
        """auto's category -> expert name, now."""
        return self.plan.routes(self.served()[1])

    # -- resolving -------------------------------------------------------------------------------
    def resolve(self, model: str) -> Target:
        """The target of ``model`` (a 404 that names the served models when there is none)."""
        m = (model or "").strip()
        if m in self.plan.base_names:
            return BASE
        if m == "auto":
            return AUTO
        refs, cats = self.served()
        try:
            r = ExpertRef.parse(m)
        except RegistryError:
            r = None
        if r is None or r.name not in refs:
            raise not_found(f"model {m!r} is not served here; models: {', '.join(self.model_names())}")
        ref = refs[r.name] if r.version is None and r.alias is None else m
        try:
            name, version = self._version(ref)
        except RegistryError as exc:
            raise not_found(f"model {m!r}: {exc}") from None
        card = self._card(name, version)
        if not isinstance(card, dict):
            raise not_found(f"model {m!r} resolves to {name}@{version}, which cannot be served here: {card}")
        return Target("expert", f"{name}@{version}", name, cats.get(name))

    def model_names(self) -> list[str]:
        return [self.plan.model_name, "base", *self.served()[0], "auto"]

    def _version(self, ref: str) -> tuple[str, int]:
        """``(name, version)`` of ``ref`` from the registry, cached for the TTL."""
        now = self.clock()
        with self._lock:
            hit = self._refs.get(ref)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        if self.registry is None:
            raise not_found(f"model {ref!r}: no registry (registry.url) is set")
        name, version = self.registry.resolve(ref)
        with self._lock:
            self._refs[ref] = (now + self.ttl, name, version)
        return name, version

    def _card(self, name: str, version: int) -> dict | str:
        key = (name, version)
        if key not in self._cards:
            card = self.registry.card(f"{name}@{version}")
            why = card_problem(card, self.plan.fingerprint, self.cfg)
            self._cards[key] = why if why else card
        return self._cards[key]

    def card(self, target: Target) -> dict | None:
        """The card of an expert target (None for the base and auto)."""
        if target.kind != "expert":
            return None
        name, _, v = target.model_id.rpartition("@")
        got = self._card(name, int(v))
        return got if isinstance(got, dict) else None
