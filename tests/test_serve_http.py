"""The server's HTTP app in one process (no Ray): the real ``openai`` client and raw HTTP on loopback.

One app for the module: the toy base with the toy experts (math, code, the classifier dispatch)
published by ``toy_experts``, an API key, ``serve.strategy=cls`` and a short first-pass cut.  The Ray
Serve deployment of the same app is tests/test_serve_ray.py.  Every bad input gets its status and
an OpenAI-shaped error naming the field, and the server still answers afterwards.
"""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from t2dist.config import load_config
from t2dist.serve.app import build_app
from t2dist.serve.frontend import Frontend
from t2dist.serve.local import LocalBackend, serve_in_thread
from t2dist.serve.plan import make_plan
from t2dist.serve.replica import EngineReplica

KEY = "sk-test-0123456789"
MATH = ["Q: 12+7=\nA:", "Q: 30+45=\nA:", "Q: 8*7=\nA:"]


def _cfg(toy_experts, *extra):
    return load_config(None, [f"registry.url={toy_experts['registry']}", f"svf.cache_dir={toy_experts['factors']}",
                              "serve.strategy=cls", "serve.dispatch_prompt_tokens=16", "serve.batch_window_ms=5",
                              *extra])


@pytest.fixture(scope="module")
def server(toy_experts):
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core machine spin at barriers (15-30x slower)
    plan = make_plan(_cfg(toy_experts), lambda m: None)
    replica = EngineReplica(plan, "hf")
    dispatch = EngineReplica(plan, "hf", pinned="dispatch@1")  # the classifier's weights, held from the start
    front = Frontend(plan, LocalBackend(replica, dispatch), api_key=KEY)
    srv = serve_in_thread(build_app(front))
    yield srv, front, replica
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0)


def _post(server, path, body, key=KEY, raw=None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server[0].url + path, content=raw, headers={**headers, "content-type": "application/json"},
                          timeout=120)
    return httpx.post(server[0].url + path, json=body, headers=headers, timeout=120)


def test_models_lists_base_experts_and_auto(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["toy", "code", "dispatch", "math", "auto"]
    math = client.models.retrieve("math")
    assert math.model_extra["t2dist"]["serves"] == "math@1" and math.model_extra["t2dist"]["category"] == "math"
    auto = client.models.retrieve("auto").model_extra["t2dist"]
    assert auto["routes"] == {"code": "code", "math": "math"} and auto["classifier"] == "dispatch"


def test_named_expert_and_base_answer_as_the_engine_does(client, server):
    """Each answer equals generate_shared on the toy model with the expert's z merged (an independent path)."""
    from t2dist.engines.generation import generate_shared

    _, front, replica = server
    policy, tok = replica.engine.policy, replica.engine.tokenizer
    for model, model_id in (("math", "math@1"), ("code", "code@1"), ("toy", "base")):
        r = client.completions.create(model=model, prompt=MATH, max_tokens=8, temperature=0, stop=["\n"])
        info = r.model_extra["t2dist"]
        assert info["expert"] == model_id and info["dispatch"] is None
        z = replica.expert_z(model_id)
        with replica_lock(replica):
            if z is None:
                policy.unmerge_()
            else:
                policy.merge_(z, "check")
            want = generate_shared(policy.model, tok, MATH, max_new_tokens=8, stop=("\n",))
            replica.engine.unset_z()  # leave the engine at the base (its version says so)
        assert [c.text for c in r.choices] == [c.text for c in want]
        assert r.usage.completion_tokens == sum(len(c.completion_ids) for c in want)


class replica_lock:  # noqa: N801 - the test touches the engine only while the server is idle
    def __init__(self, replica):
        self.replica = replica

    def __enter__(self):
        assert self.replica.scheduler.depth == 0

    def __exit__(self, *exc):
        return False


def test_chat_and_streaming_equal_the_whole_answers(client):
    for model in ("math", "toy", "auto"):
        for chat in (False, True):
            kw = dict(model=model, max_tokens=10, temperature=0, stop=["\n"], n=2)
            if chat:
                kw["messages"] = [{"role": "user", "content": MATH[1]}]
                whole = client.chat.completions.create(**kw)
                texts = [c.message.content for c in whole.choices]
                stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
            else:
                kw["prompt"] = MATH[:2]
                whole = client.completions.create(**kw)
                texts = [c.text for c in whole.choices]
                stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
            got: dict[int, str] = {}
            finish, usage, pieces = {}, None, 0
            for ch in stream:
                if ch.usage is not None:
                    usage = ch.usage
                for c in ch.choices:
                    piece = c.delta.content if chat else c.text
                    got[c.index] = got.get(c.index, "") + (piece or "")
                    pieces += bool(piece)
                    if c.finish_reason:
                        finish[c.index] = c.finish_reason
            assert [got[i] for i in range(len(texts))] == texts, (model, chat)
            assert finish == {i: c.finish_reason for i, c in enumerate(whole.choices)}
            assert usage.completion_tokens == whole.usage.completion_tokens
            assert whole.model_extra["t2dist"]["expert"]
    assert pieces > len(texts)  # token by token, not one piece per choice


def test_auto_with_truncation_labels_as_the_classifier_does_on_the_cut_text(client, server):
    """model=auto: the first pass reads the first 16 tokens; its label is the classifier's on that cut text."""
    from t2dist.adapt.dispatch import parse_label
    from t2dist.engines.generation import generate_shared
    from t2dist.serve.dispatch import question

    _, front, replica = server
    plan = front.plan
    prompts = ["Q: 12+7=\nA:", "Q: mul 3 4 then add 5 then sub 2 and say it\nA:", "Q: caps abcde\nA:"]
    policy, tok = replica.engine.policy, replica.engine.tokenizer
    with replica_lock(replica):
        policy.merge_(replica.expert_z("dispatch@1"), "check")
        first = generate_shared(policy.model, tok, [question(p, tok, plan.dispatch) for p in prompts],
                                max_new_tokens=plan.dispatch.max_new_tokens, stop=("\n",))
        replica.engine.unset_z()
    want = [parse_label(c.text, ["code", "math", "other"]) for c in first]
    got = []
    for p in prompts:
        r = client.completions.create(model="auto", prompt=p, max_tokens=6, temperature=0, stop=["\n"])
        info = r.model_extra["t2dist"]
        assert info["strategy"] == "cls" and info["expert"] == {"math": "math@1", "code": "code@1"}.get(
            info["dispatch"], "base")
        got.append(info["dispatch"])
    assert got == want
    assert len(tok(prompts[1])["input_ids"]) > 16  # the cut mattered for one of them


BAD = [  # (path, body or raw bytes, status, param, words in the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "model"),
    ("/v1/completions", {"model": "math"}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "math", "prompt": "x", "temperature": 5}, 400, "temperature", "less than or equal"),
    ("/v1/completions", {"model": "math", "prompt": "x", "n": 0}, 400, "n", "greater than"),
    ("/v1/completions", {"model": "math", "prompt": "x", "n": 1000}, 400, "n", "less than"),
    ("/v1/completions", {"model": "math", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than"),
    ("/v1/completions", {"model": "math", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most"),
    ("/v1/completions", {"model": "math", "prompt": "x", "stop": [""]}, 400, "stop", "empty"),
    ("/v1/completions", {"model": "math", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("/v1/completions", {"model": "math", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": "math", "prompt": "x", "max_tokens": 500}, 400, "max_tokens", "model's length"),
    ("/v1/completions", {"model": "math", "prompt": "Q" * 400}, 400, "prompt", "model's length is"),
    ("/v1/completions", {"model": "math", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "math", "prompt": "x", "logprobs": 3}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"model": "math", "prompt": "x", "seed": -1}, 400, "seed", "greater than"),
    ("/v1/completions", {"model": "math", "prompt": []}, 400, "prompt", "1 to 64"),
    ("/v1/completions", {"model": "chess", "prompt": "x"}, 404, "model", "not served here"),
    ("/v1/completions", {"model": "math@9", "prompt": "x"}, 404, "model", "no version 9"),
    ("/v1/chat/completions", {"model": "math", "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": "math", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "Input should be"),
    ("/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/embeddings", {"model": "math", "input": "x"}, 404, None, "Not Found"),
]


def test_every_bad_input_is_refused_with_an_openai_error_and_the_server_goes_on(server, client):
    for path, body, status, param, words in BAD:
        r = _post(server, path, None if isinstance(body, bytes) else body, raw=body if isinstance(body, bytes) else None)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
        assert words in err["message"], (body, err)
    r = httpx.post(server[0].url + "/v1/completions", content=b"x" * (5 * 1024 * 1024),
                   headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server[0].url + "/v1/completions", timeout=30).status_code == 405
    ok = client.completions.create(model="math", prompt="Q: 1+1=\nA:", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_required_on_v1_and_only_there(server):
    url = server[0].url
    body = {"model": "toy", "prompt": "Q: 1+1=\nA:", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200
    r = httpx.post(url + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200


def test_a_corrupt_expert_is_refused_by_name_and_the_others_keep_serving(server, client, toy_experts):
    from t2dist.registry import Registry

    reg = Registry(toy_experts["registry"])
    ref = reg.publish_dir(Path(toy_experts["registry"]) / "experts" / "code" / "1", name="code")  # code@2
    assert ref == "code@2"
    zfile = Path(toy_experts["registry"]) / "experts" / "code" / "2" / "z.safetensors"
    data = bytearray(zfile.read_bytes())
    data[-1] ^= 0xFF
    zfile.write_bytes(bytes(data))
    try:
        r = _post(server, "/v1/completions", {"model": "code@2", "prompt": "Q: 1+1=\nA:", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "expert_corrupt"
        assert "code@2" in r.json()["error"]["message"] and "sha256" in r.json()["error"]["message"]
        for model in ("code@1", "math", "toy"):
            assert client.completions.create(model=model, prompt="Q: 1+1=\nA:", max_tokens=2).choices
    finally:
        shutil.rmtree(zfile.parent.parent / "2")


def test_metrics_count_every_request_of_the_app(server, client):
    url = server[0].url

    def samples():
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = samples()
    client.completions.create(model="math", prompt="Q: 2+2=\nA:", max_tokens=3, temperature=0)
    client.completions.create(model="auto", prompt="Q: 2+2=\nA:", max_tokens=3, temperature=0)
    _post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    after = samples()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("t2dist_requests_total", model="math", expert="math@1", status="200") == 1
    assert delta("t2dist_requests_total", model="unknown", expert="", status="404") == 1
    auto = [k for k in after if k[0] == "t2dist_requests_total" and ("model", "auto") in k[1]]
    assert sum(after[k] - before.get(k, 0) for k in auto) == 1
    assert sum(after[k] - before.get(k, 0) for k in after if k[0] == "t2dist_dispatch_labels_total") == 1
    switches = [k for k in after if k[0] == "t2dist_expert_switches_total"]
    assert switches and all(after[k] >= 0 for k in switches)
    assert any(k[0] == "t2dist_queue_depth" for k in after)
    assert after[("t2dist_requests_in_flight", ())] == 0


def test_a_full_queue_answers_429(toy_experts, server):
    """A replica with serve.max_queue=1 and a long gathering window: the second waiting request is refused."""
    _, front, replica = server
    plan = make_plan(_cfg(toy_experts, "serve.max_queue=1", "serve.batch_window_ms=1500"), lambda m: None)
    small = EngineReplica(plan, "hf", engine=replica.engine)
    app = build_app(Frontend(plan, LocalBackend(small), tokenizer=front.tokenizer))
    srv = serve_in_thread(app)
    try:
        async def two():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                body = {"model": "toy", "prompt": "Q: 1+1=\nA:", "max_tokens": 2, "temperature": 0}
                first = asyncio.ensure_future(c.post("/v1/completions", json=body))
                await asyncio.sleep(0.5)
                second = await c.post("/v1/completions", json=body)
                return await first, second

        first, second = asyncio.run(two())
        assert first.status_code == 200
        assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
        assert "serve.max_queue" in second.json()["error"]["message"]
    finally:
        srv.stop()
        replica.engine.unset_z()
    json.dumps(first.json())
