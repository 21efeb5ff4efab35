"""The server's core without Ray and without HTTP: per-request generation, streaming, the early label stop,
the batching scheduler, the resolver's cache, request parsing; and the Ray app's teardown, Ray's calls recorded.

References are independent computations: ``generate_shared`` called per request (what the engine does
for one request alone), ``parse_label`` on the whole generation, a fake engine that records its calls.
"""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from t2dist.adapt.dispatch import parse_label
from t2dist.engines.generation import generate_shared
from t2dist.engines.requests import GenRequest, TextStream, generate_requests_shared
from t2dist.serve.dispatch import label_decided, question, truncate, DispatchSpec
from t2dist.serve.errors import ServeError
from t2dist.serve.scheduler import BatchScheduler


@pytest.fixture(scope="module")
def toy():
    from t2dist.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("toy")


PROMPTS = ["Q: 12+7=\nA:", "Q: caps abc\nA:", "Q: 3*4=\nA:", "Q: mul 2 3\nA:", "Which task?\nQ: 5+5=\nKind:"]


def _ids(tok, p):
    return tok(p, add_special_tokens=True)["input_ids"]


# ----------------------------------------------------------------------------- per-request generation
def test_batched_requests_equal_each_request_alone(toy):
    """Greedy requests with different max_tokens and n share a decode loop; each equals the request alone."""
    model, tok = toy
    reqs = [GenRequest(_ids(tok, p), n=n, max_new_tokens=m, stop=("\n",))
            for p, n, m in zip(PROMPTS, [1, 2, 1, 1, 3], [3, 8, 12, 1, 6])]
    reqs.append(GenRequest(_ids(tok, PROMPTS[0]), max_new_tokens=9, stop=("=",)))  # other stops: own group
    got = generate_requests_shared(model, tok, reqs, batch_size=64)
    for r, comps in zip(reqs, got):
        alone = generate_shared(model, tok, [r.prompt_ids], num_samples=r.n, max_new_tokens=r.max_new_tokens,
                                stop=r.stop)
        assert [c.text for c in comps] == [c.text for c in alone]
        assert [c.completion_ids for c in comps] == [c.completion_ids for c in alone]
        assert [c.stop_reason for c in comps] == [c.stop_reason for c in alone]
    assert any(c.stop_reason == "length" for comps in got for c in comps)  # the per-row limits mattered


def test_seeded_sampling_is_the_same_with_or_without_neighbours(toy):
    model, tok = toy
    seeded = GenRequest(_ids(tok, PROMPTS[2]), n=3, temperature=1.0, max_new_tokens=8, seed=11)
    others = [GenRequest(_ids(tok, p), n=2, temperature=1.0, max_new_tokens=8) for p in PROMPTS]
    alone = generate_requests_shared(model, tok, [seeded], batch_size=64)[0]
    crowded = generate_requests_shared(model, tok, [*others, seeded], batch_size=64)[-1]
    assert [c.completion_ids for c in alone] == [c.completion_ids for c in crowded]
    ref = generate_shared(model, tok, [seeded.prompt_ids], num_samples=3, temperature=1.0, max_new_tokens=8,
                          stop=(), seed=11)
    assert [c.completion_ids for c in alone] == [c.completion_ids for c in ref]


def test_streamed_text_equals_the_final_text(toy):
    model, tok = toy
    parts: dict[tuple[int, int], list[str]] = {}
    reqs = []
    for i, p in enumerate(PROMPTS):
        for stop in [("\n",), ("A:", "\n\n"), ()]:
            key = len(reqs)
            reqs.append(GenRequest(_ids(tok, p), n=2, temperature=0.7, max_new_tokens=12, stop=stop, seed=i,
                                   on_text=lambda s, d, k=key: parts.setdefault((k, s), []).append(d)))
    got = generate_requests_shared(model, tok, reqs, batch_size=64)
    for k, comps in enumerate(got):
        for s, c in enumerate(comps):
            assert "".join(parts.get((k, s), [])) == c.text
    assert sum(len(v) > 1 for v in parts.values()) > 5  # really token by token


def test_text_stream_holds_back_a_possible_stop_string(toy):
    _, tok = toy
    out: list[str] = []
    ts = TextStream(tok, ("XY",), out.append)
    for ch in "abX":
        ts.push(_ids(tok, ch)[-1])
    assert "".join(out) == "ab"  # 'X' may start 'XY'
    assert ts.push(_ids(tok, "Y")[-1]) is True and "".join(out) == "ab"
    ts.close("ab")
    assert "".join(out) == "ab"


def test_cancelled_and_stop_when_requests_finish_early(toy):
    model, tok = toy
    flag = {"stop": False}
    long = GenRequest(_ids(tok, PROMPTS[0]), max_new_tokens=30, stop=(), is_cancelled=lambda: flag["stop"])
    early = GenRequest(_ids(tok, PROMPTS[0]), max_new_tokens=30, stop=(), stop_when=lambda t: len(t) >= 3)
    flag["stop"] = True
    got = generate_requests_shared(model, tok, [long, early], batch_size=64)
    assert len(got[0][0].completion_ids) == 1  # cancelled: finished after its first token
    full = generate_shared(model, tok, [early.prompt_ids], max_new_tokens=30, stop=())[0]
    n = len(got[1][0].completion_ids)
    assert n < 30 and got[1][0].completion_ids == full.completion_ids[:n]
    assert len(tok.decode(full.completion_ids[:n - 1], skip_special_tokens=True)) < 3 <= len(got[1][0].text)


# ----------------------------------------------------------------------------- the first pass
CATS = ("math", "code", "reasoning", "other")


def _texts():
    rng = random.Random(0)
    words = ["math", "Math", "ma", "m", "code", "co", "reasoning", "reas", "other", "science", "a", "it", "is",
             "mathematics", "programming", "chess", "", " ", "\n", ".", ",", "!", "2"]
    out = []
    for _ in range(3000):
        out.append("".join(rng.choice([" ", "", "\n", "."]) + rng.choice(words) for _ in range(rng.randint(1, 5))))
    return out


def test_label_decided_stops_only_where_the_label_cannot_change():
    """parse_label of every prefix where the predicate first holds equals parse_label of the whole text."""
    decided = label_decided(CATS)
    stopped = 0
    for text in _texts():
        full = parse_label(text, CATS)
        for k in range(1, len(text) + 1):
            if decided(text[:k]):
                stopped += 1
                assert parse_label(text[:k], CATS) == full, (text, k)
                break
    assert stopped > 500  # it does stop early (771 of these 3000 texts)


def test_dispatch_question_truncates_the_prompt(toy):
    _, tok = toy
    spec = DispatchSpec("Which task?\n{prompt}\nKind:", "never", "", 10, 8, CATS)
    assert question("Q: 1+1=\nA:", tok, spec) == "Which task?\nQ: 1+1=\n\nKind:"  # 11 characters (tokens) > 8: cut
    assert truncate("Q: 1+1=\nA:", tok, 8) == "Q: 1+1=\n" and truncate("Q: 1+1=", tok, 8) == "Q: 1+1="
    assert truncate("abc", tok, None) == "abc"


# ----------------------------------------------------------------------------- the scheduler
class FakeEngine:
    """Records engine calls; each request's answer is its model id."""

    def __init__(self, delay: float = 0.0):
        self.held, self.calls, self.delay = "base", [], delay

    def run(self, model_id, z, reqs):
        import time

        time.sleep(self.delay)
        if model_id != self.held:
            self.held = model_id
        self.calls.append((model_id, len(reqs)))
        return [[model_id] for _ in reqs]


def test_rounds_group_by_expert_held_weights_first():
    eng = FakeEngine()
    sched = BatchScheduler(eng.run, lambda: eng.held, window_s=0.05, max_batch=3)

    async def go():
        order = ["a", "b", "a", "base", "b", "a", "a", "c"]
        jobs = [sched.submit(m, None, GenRequest([1], n=1)) for m in order]
        got = await asyncio.gather(*(j.future for j in jobs))
        return order, got

    order, got = asyncio.run(go())
    assert [g[0] for g in got] == order  # each request answered with its own model
    # one round: base (held) first, then by oldest request: a (4 requests: 3 + 1 by max_batch), b, c
    assert eng.calls == [("base", 1), ("a", 3), ("a", 1), ("b", 2), ("c", 1)]


def test_queue_full_is_a_429_before_any_work():
    eng = FakeEngine(delay=0.3)
    sched = BatchScheduler(eng.run, lambda: eng.held, window_s=0.0, max_batch=1, max_queue=2)

    async def go():
        first = sched.submit("a", None, GenRequest([1]))
        await asyncio.sleep(0.1)  # the first is in the engine now; two more fill the queue
        more = [sched.submit("a", None, GenRequest([1])) for _ in range(2)]
        with pytest.raises(ServeError) as err:
            sched.submit("a", None, GenRequest([1]))
        await asyncio.gather(first.future, *(j.future for j in more))
        return err.value

    err = asyncio.run(go())
    assert err.status == 429 and err.code == "queue_full" and sched.rejected == 1
    assert len(eng.calls) == 3


# ----------------------------------------------------------------------------- the resolver
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_resolver_follows_the_registry_within_its_cache_period(tmp_path):
    from t2dist.config import load_config
    from t2dist.experts.expert import make_card
    from t2dist.policy.load import load_policy
    from t2dist.registry import Registry
    from t2dist.serve.plan import make_plan
    from t2dist.serve.resolver import ExpertResolver

    cfg = load_config(None, [f"svf.cache_dir={tmp_path / 'f'}", f"registry.url={tmp_path / 'reg'}",
                             "serve.resolve_ttl_s=5"])
    svf, _ = load_policy(cfg)
    reg = Registry(tmp_path / "reg", create=True)
    z = svf.neutral_z()
    reg.publish(z, make_card(svf, name="math", task="math", base_model="toy"))
    alien = make_card(svf, name="alien", task="code", base_model="other")
    alien["base_fingerprint"] = "0" * 32
    reg.publish(z, alien)
    lines: list[str] = []
    plan = make_plan(cfg, lines.append)
    assert list(plan.experts) == ["math"] and any("not serving 'alien'" in x and "another base" in x for x in lines)
    clock = Clock()
    res = ExpertResolver(plan, clock=clock)
    assert res.resolve("math").model_id == "math@1" and res.resolve("toy").model_id == "base"
    assert res.resolve("auto").kind == "auto" and res.routes() == {"math": "math"}
    reg.publish(z, make_card(svf, name="math", task="math", base_model="toy"))
    reg.publish(z, make_card(svf, name="code", task="code", base_model="toy"))
    reg.set_alias("math", "champion", 1)
    assert res.resolve("math").model_id == "math@1"  # cached
    with pytest.raises(ServeError) as err:
        res.resolve("code")
    assert err.value.status == 404 and "not served here" in err.value.message
    clock.t = 5.0  # the cache period has passed: the new version and the new name are served
    assert res.resolve("math").model_id == "math@2" and res.resolve("code").model_id == "code@1"
    assert res.resolve("math:champion").model_id == "math@1" and res.resolve("math@1").model_id == "math@1"
    assert res.routes() == {"math": "math", "code": "code"}
    for bad, why in [("math@7", "no version 7"), ("alien", "not served here"), ("chess", "not served here"),
                     ("math:beta", "no alias 'beta'"), ("!!", "not served here")]:
        with pytest.raises(ServeError) as err:
            res.resolve(bad)
        assert err.value.status == 404 and why in err.value.message, (bad, err.value.message)


def test_engine_auto_measures_once_and_caches_per_machine_and_model(tmp_path, monkeypatch):
    import json

    from t2dist.config import load_config
    from t2dist.serve import engine_choice
    from t2dist.serve.plan import make_plan

    monkeypatch.setenv("T2DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("t2dist.engines.vllm.vllm_available", lambda: (True, "0.32.0"))
    plan = make_plan(load_config(None, [f"svf.cache_dir={tmp_path / 'f'}"]), lambda m: None)
    calls = []

    def fake(plan, name):
        calls.append(name)
        return {"tokens_per_s": {"hf": 30.0, "vllm": 12.0}[name], "seconds": 1.0, "tokens": 30, "start_s": 0.1}

    name, why = engine_choice.choose_engine(plan, lambda m: None, measure=fake)
    assert name == "hf" and calls == ["hf", "vllm"] and "hf 30.0 vs vllm 12.0 tokens/s" in why
    name, why = engine_choice.choose_engine(plan, lambda m: None, measure=fake)
    assert name == "hf" and calls == ["hf", "vllm"] and "cached" in why  # no second measurement
    saved = json.loads(engine_choice.cache_file().read_text())
    (key,) = saved
    assert plan.fingerprint in key and "vllm 0.32.0" in key and key.startswith("cpu:")
    plan.fingerprint = "another-model"
    assert engine_choice.choose_engine(plan, lambda m: None, measure=fake)[0] == "hf" and len(calls) == 4
    for over, want in (("serve.engine=vllm", ("vllm", "serve.engine=vllm")),
                       ("serve.mode=lora", ("vllm", "serve.mode=lora runs on vLLM's multi-LoRA path"))):
        p = make_plan(load_config(None, [f"svf.cache_dir={tmp_path / 'f'}", over]), lambda m: None)
        assert engine_choice.choose_engine(p, lambda m: None, measure=fake) == want
    monkeypatch.setattr("t2dist.engines.vllm.vllm_available", lambda: (False, "no vllm"))
    assert engine_choice.choose_engine(plan, lambda m: None, measure=fake)[0] == "hf" and len(calls) == 4
    real = engine_choice.measure_engine(plan, "hf")  # the real workload on the toy's HF engine
    assert real["tokens"] > 0 and real["tokens_per_s"] > 0


def test_a_shared_prefix_is_prefilled_once_with_the_same_numbers(toy):
    """reuse_prefix: logits after the prompts equal a full prefill's (float tolerance) and greedy answers agree."""
    from t2dist.engines.generation import _pad_id, _prefill, common_prefix

    model, tok = toy
    head = "Which task?\nQ: some shared words here\n"  # 39 characters: the toy's tokens are characters
    prompts = [head + p for p in PROMPTS]
    rows = [_ids(tok, p) for p in prompts]
    assert common_prefix(rows) >= 16 and common_prefix([rows[0]]) == len(rows[0]) - 1
    with torch.no_grad():
        full, _, _ = _prefill(model, rows, _pad_id(tok), torch.device("cpu"), reuse_prefix=False)
        once, _, mask = _prefill(model, rows, _pad_id(tok), torch.device("cpu"), reuse_prefix=True)
    assert torch.allclose(full, once, atol=1e-4, rtol=1e-4)
    assert mask.shape[1] == common_prefix(rows) + max(len(r) for r in rows) - common_prefix(rows)
    a = generate_shared(model, tok, prompts, num_samples=2, max_new_tokens=10, stop=("\n",))
    b = generate_shared(model, tok, prompts, num_samples=2, max_new_tokens=10, stop=("\n",), reuse_prefix=True)
    assert [c.text for c in a] == [c.text for c in b] and any(c.text for c in a)


@pytest.mark.parametrize("args,needle", [
    (["serve.port=70000"], "serve.port"),
    (["serve.strategy=guess"], "serve.strategy"),
    (["serve.mode=lora", "serve.engine=hf"], "serve.mode=lora runs on vLLM's multi-LoRA path"),
    (["serve.experts=[chess]"], "serve.experts: unknown expert 'chess'"),
    (["serve.strategy=cls"], "serve.cls_expert='dispatch': unknown expert 'dispatch'"),
])
def test_serve_refuses_a_bad_setup_in_one_line_before_ray_starts(args, needle, tmp_path):
    import os
    import subprocess
    import sys

    from t2dist.registry import Registry

    Registry(tmp_path / "reg", create=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2dist", "serve", "--model", "toy", "--registry", str(tmp_path / "reg"),
                           f"svf.cache_dir={tmp_path / 'f'}", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("owns", [True, False])
def test_stopping_the_server_ends_even_when_serve_hangs(owns, monkeypatch):
    """Ctrl-C: Serve's teardown (waiting on a replica that is being replaced) may hang; the server stops Ray
    when it owns it after the timeout, says so, and returns; a teardown that fails re-raises after Ray stopped."""
    from t2dist.serve import ray_app

    calls, said, release = [], [], threading.Event()
    monkeypatch.setattr(ray_app.serve, "delete", lambda name: calls.append(f"delete {name}") or release.wait(30))
    monkeypatch.setattr(ray_app.serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(ray_app.ray, "shutdown", lambda: calls.append("ray.shutdown"))
    assert ray_app.teardown(owns, said.append, timeout_s=1.0)  # Ray itself stopped: a clean end
    assert calls == ["delete t2dist"] + (["ray.shutdown"] if owns else [])
    assert said == ["Ray Serve did not stop within 1s" + ("; stopping Ray" if owns else "; leaving it")]
    release.set()  # the abandoned teardown now finishes (its serve.shutdown call lands in calls): wait for it
    for t in threading.enumerate():
        if t.name == "t2dist-serve-teardown":
            t.join(30)

    calls.clear(), said.clear()
    ray_app.teardown(owns, said.append, timeout_s=30)  # delete returns at once now
    assert calls == (["delete t2dist", "serve.shutdown", "ray.shutdown"] if owns else ["delete t2dist"])
    assert said == []

    calls.clear()  # ray.shutdown() itself hangs: bounded too, and the caller learns the end was not clean
    ray_release = threading.Event()
    monkeypatch.setattr(ray_app.ray, "shutdown", lambda: calls.append("ray.shutdown") or ray_release.wait(30))
    assert ray_app.teardown(owns, said.append, timeout_s=30, ray_timeout_s=1.0) is (not owns)
    assert said == (["Ray did not stop within 1s; its processes end with this one"] if owns else [])
    ray_release.set()
    said.clear()
    monkeypatch.setattr(ray_app.ray, "shutdown", lambda: calls.append("ray.shutdown"))

    def broken(name):
        raise RuntimeError("controller gone")

    calls.clear()
    monkeypatch.setattr(ray_app.serve, "delete", broken)
    with pytest.raises(RuntimeError, match="controller gone"):
        ray_app.teardown(owns, said.append, timeout_s=30)
    assert calls == (["ray.shutdown"] if owns else [])


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_serving_stops_the_server_through_its_teardown(signum, monkeypatch):
    """Ctrl-C or SIGTERM while serving is taken by the server's own handler, which only sets the stop event;
    the app is torn down and the handlers in place before are back. (This test's handlers, in place before,
    set the event too, so a server without its own handler also stops, and says so differently.)"""
    import os
    import signal
    from types import SimpleNamespace

    from t2dist.serve import ray_app

    calls, said, stop, fell_through = [], [], threading.Event(), []
    monkeypatch.setattr(ray_app, "connect", lambda cfg: "local")
    monkeypatch.setattr(ray_app, "build_app", lambda *a: "app")
    monkeypatch.setattr(ray_app.serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(ray_app.serve, "run", lambda app, **kw: calls.append(f"serve.run {app}"))
    monkeypatch.setattr(ray_app, "teardown", lambda owns, say: calls.append(f"teardown owns={owns}") or True)

    def ours(signum, frame):
        fell_through.append(signum)
        stop.set()

    plan = SimpleNamespace(cfg=SimpleNamespace(serve=SimpleNamespace(host="127.0.0.1", port=1)))
    sender = threading.Timer(0.5, lambda: os.kill(os.getpid(), getattr(signal, signum)))
    before = {sig: signal.signal(sig, ours) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sender.start()
        assert ray_app.run(plan, "hf", None, said.append, stop=stop) is True
        sender.join()
        assert {sig: signal.getsignal(sig) for sig in before} == {sig: ours for sig in before}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert fell_through == [] and stop.is_set()
    assert calls == ["serve.start", "serve.run app", "teardown owns=True"]
    assert said[1:] == [f"stopping ({signum}): deleting the app, then Ray Serve and Ray", "stopped"], said
