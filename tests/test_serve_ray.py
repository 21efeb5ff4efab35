"""``t2dist serve`` on Ray Serve, as a user runs it: a subprocess on a loopback port, the real ``openai`` client.

One server for the module (a local Ray cluster of its own, ``ray.address=local``): the toy base with the
toy experts of ``toy_experts`` (math, code, the classifier dispatch), two engine replicas and one
dispatch replica, ``serve.strategy=cls``, the first pass reading whole prompts (so ``auto`` must equal
``t2dist adapt`` exactly), a 1 s resolve cache, an API key from ``$T2DIST_API_KEY``.  References are the
project's own commands' code paths in this process: ``t2dist eval --expert`` (an HF engine with the
expert's z set, ``evaluate``) and ``t2dist adapt`` (``orchestration.adapt.setup`` + ``TwoPass.run``).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import httpx
import pytest

from serve_helpers import ServerProcess
from t2dist.serve.local import free_port

KEY = "sk-ray-test-9876543210"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(toy_experts, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-ray") / "serve.log"
    srv = ServerProcess(["--model", "toy", "--registry", toy_experts["registry"], f"svf.cache_dir={toy_experts['factors']}",
                         "ray.address=local", "serve.engine=hf", "serve.strategy=cls", "serve.replicas=2",
                         "serve.cpus_per_replica=0.5", "serve.dispatch_replicas=1", "serve.threads_per_replica=1",
                         "serve.dispatch_prompt_tokens=null", "serve.resolve_ttl_s=1", "serve.batch_window_ms=10"],
                        free_port(), log, extra_env={"T2DIST_API_KEY": KEY})
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
        out = srv.output()
        assert rc == 0, out[-3000:]
        assert out.rstrip().endswith("[t2dist serve] stopped"), out[-2000:]
        assert KEY not in out  # the key is never logged


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def test_completions_chat_and_streaming_through_the_openai_client(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "toy" and ids[-1] == "auto" and {"math", "code", "dispatch"} <= set(ids)
    r = client.completions.create(model="math", prompt="Q: 12+7=\nA:", max_tokens=6, temperature=0, stop=["\n"])
    assert r.model_extra["t2dist"]["expert"] == "math@1" and r.model_extra["t2dist"]["replica"].startswith("experts-")
    c = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Q: 12+7=\nA:"}],
                                       max_tokens=6, temperature=0, stop=["\n"])
    info = c.model_extra["t2dist"]
    assert info["strategy"] == "cls" and info["dispatch"] in ("math", "code", "other")
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="math", prompt="Q: 12+7=\nA:", max_tokens=6, temperature=0, stop=["\n"], stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    raw = client.completions.with_raw_response.create(model="auto", prompt="Q: 12+7=\nA:", max_tokens=6,
                                                       temperature=0, stop=["\n"])
    body = raw.parse().model_extra["t2dist"]
    assert raw.headers["x-t2dist-expert"] == body["expert"] and raw.headers["x-t2dist-dispatch"] == body["dispatch"]


def test_a_named_expert_answers_as_t2dist_eval_does(client, toy_experts):
    """``t2dist eval --expert math --task math`` (its code path: HF engine, expert z set, evaluate) vs the server."""
    from t2dist.config import load_config
    from t2dist.engines import make_engine
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.registry import read_expert_ref
    from t2dist.tasks import get_task

    task, n = get_task("math"), 24
    expert = read_expert_ref("math", toy_experts["registry"])
    cfg = load_config(None, ["model.path=toy", f"svf.cache_dir={toy_experts['factors']}"])
    engine = make_engine(cfg, "hf", batch_size=cfg.eval.batch_size)
    try:
        engine.set_z(expert.z, "math")
        ref = evaluate(engine, task, split="test", limit=n, records=True)
    finally:
        engine.close()
    exs = task.examples("test")[:n]
    got = [client.completions.create(model="math", prompt=task.prompt_for(e, None), max_tokens=task.max_new_tokens,
                                     temperature=0, stop=list(task.stop)).choices[0].text for e in exs]
    assert got == [r["completion"] for r in ref.records]
    base = [client.completions.create(model="toy", prompt=task.prompt_for(e, None), max_tokens=task.max_new_tokens,
                                      temperature=0, stop=list(task.stop)).choices[0].text for e in exs]
    assert base != got  # the expert really answers differently from the base


def test_auto_answers_as_t2dist_adapt_does(client, toy_experts):
    """``t2dist adapt --strategy cls --experts math,code --cls-expert dispatch --task mixed`` vs model=auto."""
    from t2dist.config import load_config
    from t2dist.orchestration.adapt import setup
    from t2dist.tasks import get_task

    task, n = get_task("mixed"), 24
    exs = task.examples("test")[:n]
    cfg = load_config(None, ["model.path=toy", f"svf.cache_dir={toy_experts['factors']}", "adapt.strategy=cls"])
    tp = setup(cfg, ["math", "code"], "dispatch", toy_experts["registry"], "cls")
    try:
        run = tp.run(task, exs, "cls")
    finally:
        tp.engine.close()
    labels, texts = [], []
    for e in exs:
        max_new, stop = task.generation_for(e)
        r = client.completions.create(model="auto", prompt=task.prompt_for(e, None), max_tokens=max_new,
                                      temperature=0, stop=list(stop))
        labels.append(r.model_extra["t2dist"]["dispatch"])
        texts.append(r.choices[0].text)
    assert labels == run.labels and texts == run.texts
    assert len(set(labels)) >= 2  # the classifier sends prompts to different experts


def _pool(n_prompts: int = 8):
    from t2dist.tasks import get_task

    task = get_task("mixed")
    exs = task.examples("test")[:n_prompts]
    return [(m, task.prompt_for(e, None), *task.generation_for(e)) for e in exs for m in ("toy", "math", "code", "auto")]


async def _one(client, model, prompt, max_new, stop, stream):
    kw = dict(model=model, prompt=prompt, max_tokens=max_new, temperature=0, stop=list(stop))
    if not stream:
        r = await client.completions.create(**kw)
        return r.choices[0].text, r.model_extra["t2dist"]["expert"]
    text, expert = "", None
    async for ch in await client.completions.create(**kw, stream=True):
        for c in ch.choices:
            text += c.text
            expert = expert or (ch.model_extra or {}).get("t2dist", {}).get("expert")
    return text, expert


def test_32_concurrent_clients_get_the_answers_each_request_gets_alone(server):
    import openai

    pool = _pool()
    alone = {}

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as c:
            for item in pool:  # each request alone first
                alone[item] = await _one(c, *item, stream=False)

            async def client_loop(i):
                out = []
                for k in range(8):
                    item = pool[(i * 8 + k * 5) % len(pool)]
                    out.append((item, await _one(c, *item, stream=(i % 4 == 0))))
                return out

            return await asyncio.wait_for(asyncio.gather(*(client_loop(i) for i in range(32))), 900)

    got = asyncio.run(run_all())
    flat = [x for per in got for x in per]
    assert len(flat) == 256
    for item, (text, expert) in flat:
        assert text == alone[item][0], item
        if item[0] != "auto":
            assert expert == alone[item][1]
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    served = sum(float(v) for v in re.findall(r'^t2dist_requests_total\{[^}]*status="200"[^}]*\} (\S+)', metrics, re.M))
    assert served >= 256 + len(pool)
    replicas = set(re.findall(r'^t2dist_expert_switches_total\{replica="([^"]+)",role="experts"\}', metrics, re.M))
    assert len(replicas) >= 1 and re.search(r'^t2dist_queue_depth\{', metrics, re.M)


def test_a_new_version_is_served_within_the_cache_period(client, toy_experts):
    from t2dist.registry import Registry

    reg = Registry(toy_experts["registry"])
    kw = dict(prompt=["Q: 12+7=\nA:", "Q: 99+1=\nA:", "Q: 5*5=\nA:"], max_tokens=6, temperature=0, stop=["\n"])
    code_answers = [c.text for c in client.completions.create(model="code", **kw).choices]
    for _ in range(4):  # "math" resolved (and cached) before the new version exists
        assert client.completions.create(model="math", **kw).model_extra["t2dist"]["expert"].startswith("math@")
    new = reg.load("code@1")
    new.card["task"] = "math"
    ref = reg.publish(new.z, new.card, name="math")  # math@2 holds code's z
    time.sleep(1.5)  # past serve.resolve_ttl_s=1: every cached resolution of "math" is stale now
    for _ in range(4):  # each request (whichever replica takes it) answers with the new version, and its z
        r = client.completions.create(model="math", **kw)
        assert r.model_extra["t2dist"]["expert"] == ref, "the new version was not served after the cache period"
        assert [c.text for c in r.choices] == code_answers
    reg.set_alias("math", "champion", 1)
    assert client.completions.create(model="math:champion", **kw).model_extra["t2dist"]["expert"] == "math@1"
    assert client.completions.create(model="math@1", **kw).model_extra["t2dist"]["expert"] == "math@1"


def test_bad_input_and_auth_on_the_served_app(server, client):
    url = server.url
    h = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", content=b"{oops", headers={**h, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", json={"model": "math", "prompt": "x", "n": -1}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                   headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for headers in ({}, {"authorization": "Bearer nope"}):
        r = httpx.post(url + "/v1/completions", json={"model": "math", "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.completions.create(model="toy", prompt="Q: 1+1=\nA:", max_tokens=2).choices


def _experts_running(url: str) -> int:
    d = httpx.get(url + "/health", timeout=30).json()["deployments"].get("Experts", {})
    return d.get("replicas", {}).get("RUNNING", 0)


def test_sigkill_of_an_engine_replica_under_load_is_survived(server, client):
    """SIGKILL an Experts replica under load: requests in flight on it get a 5xx, the others and later ones
    succeed, Ray Serve replaces the replica (its /health shows 2 running Experts replicas again)."""
    import openai

    assert _experts_running(server.url) == 2
    victim = client.completions.create(model="math", prompt="Q: 1+1=\nA:", max_tokens=3).model_extra["t2dist"]["replica"]
    outcomes: list[tuple[float, object]] = []
    stop = threading.Event()

    def load(model):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                r = c.completions.create(model=model, prompt="Q: 21+21=\nA:", max_tokens=8, temperature=0)
                outcomes.append((time.monotonic(), r.model_extra["t2dist"]["replica"]))
            except openai.APIStatusError as exc:
                outcomes.append((time.monotonic(), exc.status_code))

    threads = [threading.Thread(target=load, args=(m,), daemon=True) for m in ("math", "code", "toy", "math")]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(int(victim.rsplit("pid", 1)[1]), signal.SIGKILL)
    killed, saw_down = time.monotonic(), False
    try:
        while time.monotonic() - killed < 300:
            running = _experts_running(server.url)
            saw_down = saw_down or running < 2
            if saw_down and running == 2:
                break
            time.sleep(0.3)
    finally:
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(150)
    assert saw_down and _experts_running(server.url) == 2, "Ray Serve did not replace the killed replica"
    errors = [o for _, o in outcomes if not isinstance(o, str)]
    assert all(500 <= e < 600 for e in errors), errors
    later = [o for t, o in outcomes if t > killed + 1]
    assert later and all(isinstance(o, str) for o in later[-4:]), later[-8:]  # later requests succeed
    assert victim not in {o for t, o in outcomes if t > killed + 1 and isinstance(o, str)}
    assert client.completions.create(model="code", prompt="Q: 2+2=\nA:", max_tokens=2).choices
