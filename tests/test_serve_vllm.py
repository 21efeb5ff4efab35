"""The server on the vLLM engine (toy base): per-request parameters in one engine loop, streaming, early stops,
z-only expert switches through the HTTP app, all against the HF engine's answers for the same z.

One vLLM engine for the module (~25 s idle, minutes on a loaded 2-core machine); skipped, with the reason,
where vllm does not import.
"""
from __future__ import annotations

import pytest
import torch

from t2dist.config import load_config
from t2dist.engines.requests import GenRequest, generate_requests_shared
from t2dist.engines.vllm import vllm_available

OK, WHY = vllm_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OK, reason=WHY)]
PROMPTS = ["Q: 12+7=\nA:", "Q: caps abc\nA:", "Q: 3*4=\nA:", "Q: mul 2 3\nA:", "Which task?\nQ: 5+5=\nKind:"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from t2dist.engines import make_engine
    from t2dist.experts.expert import make_card
    from t2dist.registry import Registry

    root = tmp_path_factory.mktemp("serve-vllm")
    cfg = load_config(None, ["model.path=toy", f"svf.cache_dir={root / 'factors'}", f"registry.url={root / 'reg'}",
                             "serve.engine=vllm", "serve.batch_window_ms=5"])
    engine = make_engine(cfg, "vllm", batch_size=32)
    reg = Registry(root / "reg", create=True)
    policy = engine.policy
    for i, name in enumerate(("math", "code")):
        g = torch.Generator().manual_seed(i)
        z = {n: 1 + 0.4 * torch.randn(v.shape, generator=g) for n, v in policy.neutral_z().items()}
        reg.publish(z, make_card(policy, name=name, task=name, base_model="toy"))
    yield cfg, engine, reg
    engine.close()


def _ids(tok, p):
    return tok(p, add_special_tokens=True)["input_ids"]


def test_per_request_parameters_in_one_loop_equal_the_hf_engine(setup):
    cfg, engine, _ = setup
    tok, policy = engine.tokenizer, engine.policy
    engine.unset_z()
    reqs = [GenRequest(_ids(tok, p), n=n, max_new_tokens=m, stop=s)
            for p, n, m, s in zip(PROMPTS, [1, 2, 1, 1, 3], [3, 8, 12, 1, 6], [("\n",), ("\n",), ("=",), (), ("\n",)])]
    got = engine.generate_requests(reqs)
    policy.unmerge_()
    ref = generate_requests_shared(policy.model, tok, reqs, batch_size=32)
    assert [[c.text for c in comps] for comps in got] == [[c.text for c in comps] for comps in ref]
    assert [[c.stop_reason for c in comps] for comps in got] == [[c.stop_reason for c in comps] for comps in ref]


def test_streaming_and_early_stops_on_vllm(setup):
    _, engine, _ = setup
    tok = engine.tokenizer
    engine.unset_z()
    parts: dict[tuple[int, int], list[str]] = {}
    reqs = [GenRequest(_ids(tok, p), n=2, temperature=0.8, max_new_tokens=10, stop=("\n",),
                       on_text=lambda s, d, k=k: parts.setdefault((k, s), []).append(d)) for k, p in enumerate(PROMPTS)]
    early = GenRequest(_ids(tok, PROMPTS[0]), max_new_tokens=30, stop=(), stop_when=lambda t: len(t) >= 3)
    got = engine.generate_requests([*reqs, early])
    for k, comps in enumerate(got[:-1]):
        for s, c in enumerate(comps):
            assert "".join(parts.get((k, s), [])) == c.text
    full = engine.generate([early.prompt_ids], max_new_tokens=30, stop=())[0]
    n = len(got[-1][0].completion_ids)
    assert n < 30 and got[-1][0].completion_ids == full.completion_ids[:n]


def test_the_http_app_on_vllm_switches_experts_exactly(setup):
    """Named experts through the app on the vLLM engine answer as the HF engine with the same z."""
    import openai

    from t2dist.engines.generation import generate_shared
    from t2dist.serve.app import build_app
    from t2dist.serve.frontend import Frontend
    from t2dist.serve.local import LocalBackend, serve_in_thread
    from t2dist.serve.plan import make_plan
    from t2dist.serve.replica import EngineReplica

    cfg, engine, reg = setup
    plan = make_plan(cfg, lambda m: None)
    replica = EngineReplica(plan, "vllm", engine=engine)
    srv = serve_in_thread(build_app(Frontend(plan, LocalBackend(replica), tokenizer=engine.tokenizer)))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        policy = engine.policy
        for model in ("math", "code", "toy", "math"):
            r = client.completions.create(model=model, prompt=PROMPTS, max_tokens=8, temperature=0, stop=["\n"])
            z = None if model == "toy" else reg.load(model).z
            if z is None:
                policy.unmerge_()
            else:
                policy.merge_(z, model)
            want = generate_shared(policy.model, engine.tokenizer, PROMPTS, max_new_tokens=8, stop=("\n",))
            assert [c.text for c in r.choices] == [c.text for c in want], model
        assert replica.switches == 4  # base -> math -> code -> base -> math: one switch per change
    finally:
        srv.stop()
        policy.unmerge_()


def test_lora_mode_answers_every_expert_in_one_batch_as_exact_switching_does(setup, tmp_path, monkeypatch):
    """serve.mode=lora: each expert exported as a PEFT adapter on first use, requests for different experts in one
    vLLM batch (no switch), greedy answers == the HF engine with the expert's z merged (full rank 128: exact)."""
    import asyncio

    from t2dist.engines.generation import generate_shared
    from t2dist.serve.plan import make_plan
    from t2dist.serve.replica import EngineReplica

    monkeypatch.setenv("T2DIST_CACHE", str(tmp_path / "cache"))
    cfg, engine, reg = setup
    cfg = cfg.model_copy(deep=True)
    cfg.serve.mode = "lora"
    plan = make_plan(cfg, lambda m: None)
    replica = EngineReplica(plan, "vllm")
    try:
        assert replica.engine.lora_options["max_lora_rank"] == 128 and plan.full_rank == 128
        models = ["math@1", "code@1", "base", "math@1", "code@1"]

        async def ask():
            return await asyncio.gather(*(replica.generate(m, {"prompt_ids": _ids(engine.tokenizer, p), "n": 1,
                                                               "temperature": 0.0, "max_tokens": 8, "stop": ["\n"]})
                                          for m, p in zip(models, PROMPTS)))

        asyncio.run(ask())  # exports the adapters (first use)
        batches = replica.scheduler.batches
        got = asyncio.run(ask())
        assert replica.switches == 0 and replica.scheduler.batches == batches + 1  # one engine call, three models
        policy = engine.policy
        for m, p, r in zip(models, PROMPTS, got):
            if m == "base":
                policy.unmerge_()
            else:
                policy.merge_(reg.load(m).z, m)
            want = generate_shared(policy.model, engine.tokenizer, [p], max_new_tokens=8, stop=("\n",))[0]
            assert r["choices"][0]["text"] == want.text, (m, p)
        adapters = list((tmp_path / "cache" / "serve-lora").rglob("adapter_config.json"))
        assert len(adapters) == 3  # math@1, code@1 and the base's zero adapter, exported once each
    finally:
        replica.engine.close()
        engine.policy.unmerge_()
