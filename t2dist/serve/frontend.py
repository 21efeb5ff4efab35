"""The ingress's work on one request: resolve the model, check the input, dispatch, call the replicas.

A request goes through these steps (no Ray here: the replicas are reached through a
:class:`Backend`, Ray Serve handles in ``t2dist/serve/ray_app.py`` or an in-process replica):

1. ``model`` -> :class:`~t2dist.serve.resolver.Target` (404 when it names nothing served);
2. the prompt as the model sees it: a completion's text as given; a chat's messages through the
   base's chat template (one user message gives exactly what ``t2dist eval``/``adapt`` give a task
   prompt: ``apply_chat_template`` with the same BOS handling); a base without a chat template (the
   toy) gets the messages' contents, one per line;
3. token counts: a prompt that leaves no room in the model's length, or an explicit ``max_tokens``
   beyond it, is a 400 naming the field; without ``max_tokens`` the answer gets ``serve.max_tokens``
   or what is left;
4. ``model=auto``: the first pass (:mod:`t2dist.serve.dispatch`) on the dispatch deployment (or the
   engine replicas) labels the user's text (a completion's prompt, a chat's last user message);
   the label's expert answers (``other``, or a category without an expert: the base);
5. the answer (or the stream) from the engine replicas, under the expert's multiplexed model id.

Every answer names the expert that answered and the first pass's label (``t2dist`` object and the
``x-t2dist-expert`` / ``x-t2dist-dispatch`` headers, docs/serving.md).
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, AsyncIterator, Protocol

from t2dist.serve import dispatch as first_pass
from t2dist.serve.errors import ServeError, bad_request, timeout
from t2dist.serve.metrics import ServeMetrics
from t2dist.serve.plan import ServePlan, load_tokenizer
from t2dist.serve.protocol import ChatCompletionRequest, model_card, new_id
from t2dist.serve.resolver import BASE, BASE_ID, ExpertResolver, Target


class Backend(Protocol):
    """How the ingress reaches the engine replicas."""

    async def generate(self, model_id: str, spec: dict, *, dispatch: bool = False) -> dict: ...

    def stream(self, model_id: str, spec: dict) -> AsyncIterator[dict]: ...


def raise_if_error(result: dict) -> dict:
    if "error" in result:
        raise ServeError.from_dict(result["error"])
    return result


class Prepared:
    """One request, checked and ready for the replicas: one entry per prompt."""

    def __init__(self, req, chat: bool, target: Target):
        self.req, self.chat, self.target = req, chat, target
        self.prompt_ids: list[list[int]] = []
        self.user_texts: list[str] = []
        self.max_tokens: list[int] = []
        self.targets: list[Target] = []
        self.labels: list[str | None] = []
        self.dispatch_s: list[float] = []
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.t0 = time.perf_counter()

    def spec(self, i: int) -> dict[str, Any]:
        r = self.req
        return {"prompt_ids": self.prompt_ids[i], "n": r.n, "temperature": r.temperature, "top_p": r.top_p,
                "max_tokens": self.max_tokens[i], "stop": list(r.stop), "seed": r.seed}

    def info(self, results: list[dict] | None = None) -> dict[str, Any]:
        """The response's ``t2dist`` object (docs/serving.md)."""
        experts = [t.expert for t in self.targets]
        out: dict[str, Any] = {"model": self.req.model, "expert": _one(experts),
                               "dispatch": _one(self.labels) if self.target.kind == "auto" else None}
        if self.target.kind == "auto":
            out["strategy"] = self._strategy
            out["dispatch_s"] = round(sum(self.dispatch_s), 6)
        if results:
            out["replica"] = _one([r.get("stats", {}).get("replica", "?") for r in results])
            out["queue_s"] = round(max(r.get("queue_s", 0.0) for r in results), 6)
            out["engine_s"] = round(max(r.get("engine_s", 0.0) for r in results), 6)
        if len(experts) > 1:
            out["prompts"] = [{"expert": e, "dispatch": lab} for e, lab in zip(experts, self.labels)]
        return out

    def headers(self) -> dict[str, str]:
        h = {"x-t2dist-expert": _one([t.expert for t in self.targets])}
        if self.target.kind == "auto":
            h["x-t2dist-dispatch"] = _one(self.labels)
        return h

    _strategy = ""


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _one(values: list) -> Any:
    """A value every prompt shares, or the values in prompt order joined by commas."""
    uniq = list(dict.fromkeys(v for v in values))
    return uniq[0] if len(uniq) == 1 else ",".join(str(v) for v in values)


class Frontend:
    """The ingress's logic (module docstring); ``app.py`` puts HTTP around it."""

    def __init__(self, plan: ServePlan, backend: Backend, *, api_key: str | None = None,
                 api_key_digest: bytes | None = None, tokenizer=None, resolver: ExpertResolver | None = None,
                 metrics: ServeMetrics | None = None):
        self.plan, self.backend = plan, backend
        # only the key's sha256 is kept (and sent to Ray Serve replicas): the key itself is never stored
        self.api_key_digest = key_digest(api_key) if api_key else api_key_digest
        self.serve = plan.serve
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(plan.cfg.model)
        self.resolver = resolver or ExpertResolver(plan)
        self.metrics = metrics or ServeMetrics()

    # -- input ----------------------------------------------------------------------------------
    def render_chat(self, req: ChatCompletionRequest) -> str:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        if not self.plan.has_chat_template:
            return "\n".join(m["content"] for m in msgs)
        tok = self.tokenizer
        try:
            out = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja errors: roles the template refuses
            raise bad_request(f"messages: the model's chat template refuses them: {exc}", param="messages") from None
        bos = getattr(tok, "bos_token", None)  # as t2dist.tasks.base.apply_chat_template: no doubled BOS
        if bos and out.startswith(bos):
            ids = tok("x", add_special_tokens=True)["input_ids"]
            if ids and ids[0] == tok.bos_token_id:
                out = out[len(bos):]
        return out

    def prepare(self, req, chat: bool, target: Target) -> Prepared:
        """Token ids and token limits of every prompt (400s name the field)."""
        p = Prepared(req, chat, target)
        texts = [self.render_chat(req)] if chat else req.prompts
        p.user_texts = [req.user_text()] if chat else list(texts)
        limit, field = req.token_limit if chat else req.max_tokens, "messages" if chat else "prompt"
        max_len = self.plan.max_model_len
        for text in texts:
            if not text:
                raise bad_request(f"{field}: the prompt is empty", param=field)
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            room = max_len - len(ids)
            if room < 1:
                raise bad_request(f"{field}: the prompt is {len(ids)} tokens; this model's length is {max_len}",
                                  param=field, code="context_length_exceeded")
            if limit is not None and limit > room:
                key = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
                raise bad_request(f"{key}={limit} is beyond the model's length: the prompt is {len(ids)} tokens "
                                  f"of {max_len}, which leaves {room}", param=key, code="context_length_exceeded")
            p.prompt_ids.append(list(ids))
            p.max_tokens.append(limit if limit is not None else min(self.serve.max_tokens, room))
        return p

    # -- routing --------------------------------------------------------------------------------
    async def resolve(self, model: str) -> Target:
        return await asyncio.to_thread(self.resolver.resolve, model)

    async def dispatch(self, text: str) -> tuple[str, Target, float]:
        """The first pass on ``text``: ``(label, target that answers, seconds)``."""
        t0 = time.perf_counter()
        routes = await asyncio.to_thread(self.resolver.routes)
        if not routes:  # no expert to route to: every label is `other` (parse_label of one category)
            self.metrics.dispatch.labels(self.serve.strategy, "other").inc()
            return "other", BASE, 0.0
        spec = self.plan.dispatch
        cats = (*routes, "other")
        q = first_pass.question(text, self.tokenizer, spec)
        ids = self.tokenizer(q, add_special_tokens=True)["input_ids"][-(self.plan.max_model_len - spec.max_new_tokens):]
        model_id = BASE_ID if self.serve.strategy == "prompt" else (await self.resolve(self.plan.cls_expert)).model_id
        res = raise_if_error(await self.backend.generate(
            model_id, {"prompt_ids": ids, "n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": spec.max_new_tokens,
                       "stop": list(spec.stop), "seed": None, "label_categories": list(cats)}, dispatch=True))
        self.metrics.observe_result(res, "dispatch")
        label = first_pass.read_label(res["choices"][0]["text"], cats)
        name = first_pass.route(label, routes)
        target = BASE if name is None else await self.resolve(name)
        self.metrics.dispatch.labels(self.serve.strategy, label).inc()
        dt = time.perf_counter() - t0
        self.metrics.first_pass.observe(dt)
        return label, target, dt

    async def route_all(self, p: Prepared) -> None:
        """The target of every prompt (the first pass of each, for auto)."""
        if p.target.kind != "auto":
            p.targets = [p.target] * len(p.prompt_ids)
            p.labels = [None] * len(p.prompt_ids)
            return
        p._strategy = self.serve.strategy
        got = await asyncio.gather(*(self.dispatch(t) for t in p.user_texts))
        p.labels = [g[0] for g in got]
        p.targets = [g[1] for g in got]
        p.dispatch_s = [g[2] for g in got]

    # -- answers --------------------------------------------------------------------------------
    async def answer(self, req, chat: bool) -> Prepared | tuple[Prepared, list[dict]]:
        """Everything before the replicas' answer; for a non-streamed request the answers too."""
        target = await self.resolve(req.model)
        p = self.prepare(req, chat, target)
        await self.route_all(p)
        if req.stream:
            return p
        results = await asyncio.gather(*(self.backend.generate(t.model_id, p.spec(i))
                                         for i, t in enumerate(p.targets)))
        for r in results:
            self.metrics.observe_result(r)
        return p, [raise_if_error(r) for r in results]

    async def with_timeout(self, coro):
        try:
            return await asyncio.wait_for(coro, self.serve.request_timeout_s)
        except asyncio.TimeoutError:
            raise timeout(self.serve.request_timeout_s) from None

    def record(self, req_model: str, p: Prepared | None, status: int, tokens: int = 0) -> None:
        kind = p.target.kind if p is not None else "unknown"
        model = {"base": "base", "auto": "auto"}.get(kind, p.target.name if p is not None else "unknown")
        expert = _one([t.expert for t in p.targets]) if p is not None and p.targets else ""
        self.metrics.requests.labels(model, expert, str(status)).inc()
        if p is not None:
            self.metrics.latency.labels(model).observe(time.perf_counter() - p.t0)
            if tokens:
                self.metrics.tokens.labels(expert).inc(tokens)

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: the base, each served expert (name, version now, category), ``auto``."""
        refs, cats = self.resolver.served()
        routes = self.resolver.routes()
        out = [model_card(self.plan.model_name, {"kind": "base", "aliases": [n for n in self.plan.base_names
                                                                              if n != self.plan.model_name]})]
        for name, ref in refs.items():
            try:
                t = self.resolver.resolve(name)
                card = self.resolver.card(t) or {}
            except ServeError as exc:
                out.append(model_card(name, {"kind": "expert", "ref": ref, "error": exc.message}))
                continue
            out.append(model_card(name, {"kind": "expert", "ref": ref, "serves": t.model_id, "task": card.get("task"),
                                         "category": cats.get(name), "auto_route": routes.get(cats.get(name)) == name,
                                         "metrics": card.get("metrics", {})}))
        out.append(model_card("auto", {"kind": "auto", "strategy": self.serve.strategy, "routes": routes,
                                       "classifier": self.plan.cls_expert if self.serve.strategy == "cls" else None}))
        return out
