"""The HTTP face of the server: a FastAPI app around a :class:`~t2dist.serve.frontend.Frontend`.

Routes (OpenAI's, plus health and metrics):

* ``GET /health`` — ``{"status": "ok" | "degraded", "deployments": {name: {"status", "replicas": {state:
  count}}}}`` (Ray Serve's view; no key needed: for load balancers and operators);
* ``GET /metrics`` — Prometheus text format (:mod:`t2dist.serve.metrics`; no key needed);
* ``GET /v1/models``, ``GET /v1/models/{id}`` — the base, every served expert, ``auto``;
* ``POST /v1/completions``, ``POST /v1/chat/completions`` — with ``stream: true`` as server-sent
  events in OpenAI's chunk format, ending with ``data: [DONE]``.

With an API key (``--api-key`` / ``T2DIST_API_KEY``) every ``/v1`` route needs
``Authorization: Bearer <key>``, compared in constant time (``hmac.compare_digest`` of the sha256
digests: only the key's digest is kept, also in the Ray Serve deployment's arguments); otherwise 401.
Every error, also an unknown route, is OpenAI-shaped JSON with its status
(:mod:`t2dist.serve.errors`); an exception nobody expected is a 500 of the same shape, logged, and
the server goes on.  Bodies over 4 MiB are refused (413) before they are parsed.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2dist.serve.errors import ServeError, internal, not_found, timeout, unauthorized
from t2dist.serve.frontend import Frontend, Prepared, key_digest, raise_if_error
from t2dist.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, chunk_body, completion_body, error_event, parse_request, sse, usage,
)

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 1024 * 1024


def check_auth(request: Request, digest: bytes | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` whose sha256 is ``digest`` (None: no key)."""
    if not digest:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()), digest):
        raise unauthorized()


def error_response(exc: ServeError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def build_app(front: Frontend) -> FastAPI:
    app = FastAPI(title="t2dist serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = ServeError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                         code="not_found" if exc.status_code == 404 else "method_not_allowed")
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(internal(f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health() -> dict:
        deployments = await front.backend.health() if hasattr(front.backend, "health") else {}
        ok = all(d.get("status") == "HEALTHY" for d in deployments.values())
        return {"status": "ok" if ok else "degraded", "model": front.plan.model_name,
                "strategy": front.serve.strategy, "deployments": deployments}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(front.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_auth(request, front.api_key_digest)
        return {"object": "list", "data": await asyncio.to_thread(front.models)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_auth(request, front.api_key_digest)
        for m in await asyncio.to_thread(front.models):
            if m["id"] == model_id:
                return m
        raise not_found(f"model {model_id!r} is not served here")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(front, request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(front, request, ChatCompletionRequest, chat=True)

    return app


async def handle(front: Frontend, request: Request, cls, chat: bool):
    """One completion request, answered whole or streamed; every outcome is counted."""
    holder: list[Prepared] = []
    status, tokens, req, streaming = 200, 0, None, False
    front.metrics.in_flight.inc()
    try:
        check_auth(request, front.api_key_digest)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before it is read
            raise ServeError(f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}", status=413,
                             code="request_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ServeError(f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", status=413,
                             code="request_too_large")
        req = parse_request(raw, cls)
        got = await front.with_timeout(_run(front, req, chat, holder))
        p = holder[0]
        if req.stream:
            streaming = True
            return StreamingResponse(_events(front, p), media_type="text/event-stream", headers=p.headers())
        body, tokens = _body(p, got)
        return JSONResponse(body, headers=p.headers())
    except ServeError as exc:
        status = exc.status
        return error_response(exc)
    finally:
        if not streaming:
            front.metrics.in_flight.dec()
            front.record(req.model if req else "", holder[0] if holder else None, status, tokens)


async def _run(front: Frontend, req, chat: bool, holder: list) -> list[dict] | None:
    target = await front.resolve(req.model)
    p = front.prepare(req, chat, target)
    holder.append(p)
    await front.route_all(p)
    if req.stream:
        return None
    results = await asyncio.gather(*(front.backend.generate(t.model_id, p.spec(i)) for i, t in enumerate(p.targets)))
    for r in results:
        front.metrics.observe_result(r)
    return [raise_if_error(r) for r in results]


def _body(p: Prepared, results: list[dict]) -> tuple[dict, int]:
    req, n = p.req, p.req.n
    choices, tokens = [], 0
    for i, r in enumerate(results):
        for s, c in enumerate(r["choices"]):
            text = c["text"]
            if not p.chat and req.echo:
                text = req.prompts[i] + text
            choices.append({"index": i * n + s, "text": text, "finish_reason": c["finish_reason"]})
            tokens += c["tokens"]
    use = usage(sum(len(ids) for ids in p.prompt_ids), tokens)
    return completion_body(p.id, req.model, choices, use, p.info(results), p.chat), tokens


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    left = len(tasks)
    try:
        while left:
            i, ev = await queue.get()
            if ev is done:
                left -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def _chunks(front: Frontend, p: Prepared) -> AsyncIterator[dict]:
    """The OpenAI chunks of a streamed answer (the ``t2dist`` object in each choice's first and last)."""
    req, n, info = p.req, p.req.n, p.info()
    rid, model, tokens = p.id, req.model, 0
    for i in range(len(p.prompt_ids) * n):
        if p.chat:
            yield chunk_body(rid, model, i, text="", chat=True, first=True, info=info)
        elif req.echo:
            yield chunk_body(rid, model, i, text=req.prompts[i // n], chat=False, info=info)
    streams = [front.backend.stream(t.model_id, p.spec(i)) for i, t in enumerate(p.targets)]
    deadline = p.t0 + front.serve.request_timeout_s
    events = _merge(streams)
    try:
        while True:
            try:
                i, ev = await asyncio.wait_for(events.__anext__(), max(0.001, deadline - time.perf_counter()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise timeout(front.serve.request_timeout_s) from None
            if "delta" in ev:
                s, text = ev["delta"]
                yield chunk_body(rid, model, i * n + s, text=text, chat=p.chat)
                continue
            front.metrics.observe_result(ev)
            raise_if_error(ev)
            for s, c in enumerate(ev["choices"]):
                tokens += c["tokens"]
                yield chunk_body(rid, model, i * n + s, text=None if p.chat else "", finish=c["finish_reason"],
                                 chat=p.chat, info={**info, **_timing(ev)})
    finally:
        await events.aclose()
    p.tokens = tokens
    if req.include_usage:
        yield chunk_body(rid, model, 0, chat=p.chat, use=usage(sum(len(x) for x in p.prompt_ids), tokens), info=info)


def _timing(ev: dict) -> dict:
    return {"replica": ev.get("stats", {}).get("replica"), "queue_s": round(ev.get("queue_s", 0.0), 6),
            "engine_s": round(ev.get("engine_s", 0.0), 6)}


async def _events(front: Frontend, p: Prepared) -> AsyncIterator[bytes]:
    status = 200
    try:
        async for chunk in _chunks(front, p):
            yield sse(chunk)
    except ServeError as exc:
        status = exc.status
        yield error_event(exc)
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes into the stream
        log.exception("stream failed")
        status = 500
        yield error_event(internal(f"internal error: {type(exc).__name__}"))
    finally:
        front.metrics.in_flight.dec()
        front.record(p.req.model, p, status, getattr(p, "tokens", 0))
    yield sse("[DONE]")
