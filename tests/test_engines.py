"""Rollout engines: the registry, config keys and the HF engine's shared-prefix sampling.

The reference is ``t2dist.engines.generation.generate`` (one prefill per (prompt, sample) row through
``model.generate``): the shared-prefix path must sample the very same tokens for the same
seed, return the learner's log-probs of them, and prefill each prompt exactly once.
The vLLM engine's tests are in tests/test_engines_vllm.py.
"""
from __future__ import annotations

import pytest
import torch

from t2dist.config import ConfigError, load_config
from t2dist.engines import ENGINES, engine_class, make_engine, register_engine
from t2dist.engines.base import RolloutEngine
from t2dist.engines.generation import generate, generate_shared
from t2dist.rl.logprobs import completion_logprobs
from t2dist.tasks import get_task


@pytest.fixture(scope="module")
def toy_prompts(toy_base):
    _, tok = toy_base
    task = get_task("math")
    return task, [task.prompt_for(e, tok) for e in task.examples("test")[:40]]


def _same(a, b) -> bool:
    return [(c.prompt_index, c.completion_ids, c.text, c.stopped) for c in a] == \
        [(c.prompt_index, c.completion_ids, c.text, c.stopped) for c in b]


def test_greedy_shared_prefix_equals_generate(toy_base, toy_prompts):
    model, tok = toy_base
    task, prompts = toy_prompts
    ref = generate(model, tok, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=16)
    got = generate_shared(model, tok, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=16)
    assert _same(ref, got)
    assert any(c.stopped for c in got) and all(c.stop_reason in ("stop", "length") for c in got)


@pytest.mark.parametrize("temperature,top_p,n,batch_size", [(1.0, 1.0, 8, 64), (0.7, 0.9, 4, 16), (1.3, 1.0, 3, 9)])
def test_sampling_shared_prefix_equals_generate_for_the_same_seed(toy_base, toy_prompts, temperature, top_p, n,
                                                                  batch_size):
    model, tok = toy_base
    task, prompts = toy_prompts
    kw = dict(num_samples=n, temperature=temperature, top_p=top_p, max_new_tokens=task.max_new_tokens,
              stop=task.stop, batch_size=batch_size, seed=11)
    ref = generate(model, tok, prompts[:24], **kw)
    got = generate_shared(model, tok, prompts[:24], **kw)
    assert _same(ref, got)
    assert len({tuple(c.completion_ids) for c in got}) > len(prompts[:24])  # really sampled, not greedy
    other = generate_shared(model, tok, prompts[:24], **{**kw, "seed": 12})
    assert not _same(got, other)


def test_logprobs_are_the_learners(toy_base, toy_prompts):
    """The engine's per-token log-probs equal a full forward pass over prompt + completion (raw, T=1)."""
    model, tok = toy_base
    task, prompts = toy_prompts
    got = generate_shared(model, tok, prompts[:10], num_samples=4, temperature=0.8, max_new_tokens=6,
                          stop=task.stop, seed=1)
    logp, mask = completion_logprobs(lambda **kw: model(**kw), [c.prompt_ids for c in got],
                                     [c.completion_ids for c in got], tok.pad_token_id)
    for i, c in enumerate(got):
        assert len(c.logprobs) == len(c.completion_ids) == int(mask[i].sum())
        torch.testing.assert_close(torch.tensor(c.logprobs), logp[i, : len(c.logprobs)].float(), atol=1e-4, rtol=0)


def test_each_prompt_is_prefilled_once(toy_base, toy_prompts):
    model, tok = toy_base
    task, prompts = toy_prompts
    rows = {"prefill": 0}

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            rows["prefill"] += ids.shape[0]

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        generate_shared(model, tok, prompts[:12], num_samples=8, temperature=1.0, max_new_tokens=4, seed=0,
                        batch_size=32)
        shared = rows["prefill"]
        rows["prefill"] = 0
        generate(model, tok, prompts[:12], num_samples=8, temperature=1.0, max_new_tokens=4, seed=0, batch_size=32)
    finally:
        handle.remove()
    assert shared == 12 and rows["prefill"] == 12 * 8


def test_prompts_as_token_ids(toy_base, toy_prompts):
    model, tok = toy_base
    task, prompts = toy_prompts
    ids = [tok(p)["input_ids"] for p in prompts[:6]]
    a = generate_shared(model, tok, prompts[:6], max_new_tokens=5, stop=task.stop)
    b = generate_shared(model, tok, ids, max_new_tokens=5, stop=task.stop)
    assert _same(a, b) and [c.prompt_ids for c in a] == ids


def test_registry_and_config_keys():
    assert {"hf", "vllm"} <= set(ENGINES)
    with pytest.raises(ValueError, match="already registered"):
        register_engine("hf", "t2dist.engines.hf:HFEngine")
    with pytest.raises(ValueError, match="unknown rollout engine 'nope'"):
        engine_class("nope")
    assert issubclass(engine_class("hf"), RolloutEngine)
    assert load_config(None, ["rollout.engine=vllm"]).rollout.engine == "vllm"
    for key in ("rollout.engine=sglang", "eval.engine=sglang"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, [key])


def _cfg(tmp_path, *extra):
    return load_config(None, ["model.path=toy", f"svf.cache_dir={tmp_path}", "rollout.batch_size=32", *extra])


def test_hf_engine_set_z_matches_merged_generate(tmp_path, toy_prompts):
    task, prompts = toy_prompts
    eng = make_engine(_cfg(tmp_path))
    base = eng.generate(prompts[:16], max_new_tokens=6, stop=task.stop)
    g = torch.Generator().manual_seed(0)
    z = {k: v * (1 + 0.5 * torch.randn(v.shape, generator=g)) for k, v in eng.policy.neutral_z().items()}
    assert eng.set_z(z, version=1) == sum(v.numel() * 4 for v in z.values())
    adapted = eng.generate(prompts[:16], n=2, temperature=1.0, max_new_tokens=6, stop=task.stop, seed=3)
    ref = generate(eng.policy.model, eng.tokenizer, prompts[:16], num_samples=2, temperature=1.0, max_new_tokens=6,
                   stop=task.stop, seed=3, batch_size=32)
    assert _same(adapted, ref) and eng.version == 1
    with pytest.raises(AttributeError):  # only set_z / unset_z change what the engine says it holds
        eng.version = 2
    assert not _same(eng.generate(prompts[:16], max_new_tokens=6, stop=task.stop), base)  # z changed the model
    eng.unset_z()
    assert _same(eng.generate(prompts[:16], max_new_tokens=6, stop=task.stop), base) and eng.version is None
    eng.set_z(z, version=None)  # set without a name: held as an unnamed version, never taken for the base
    assert eng.version is not None and eng.version != eng.policy.merged_version.__class__()
    eng.unset_z()


def test_hf_engine_with_a_lora_policy(tmp_path, toy_prompts):
    task, prompts = toy_prompts
    eng = make_engine(_cfg(tmp_path, "policy.kind=lora", "lora.r=2"))
    z = eng.policy.neutral_z()
    eng.set_z(z, version=0)
    out = eng.generate(prompts[:4], n=3, temperature=1.0, max_new_tokens=4, stop=task.stop, seed=0)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(len(c.logprobs) == len(c.completion_ids) for c in out)


def test_rollout_actor_exits_when_its_engine_process_dies(monkeypatch):
    """An EngineDied inside an actor method ends the process (Ray restarts the actor, the driver redoes the step)."""
    import actors.rollout as ar
    from t2dist.engines.base import EngineDied

    exits = []
    monkeypatch.setattr(ar.os, "_exit", lambda code: exits.append(code))

    class Fake:
        role, index = "rollout", 3

        @ar._exit_on_engine_death
        def rollout(self):
            raise EngineDied("engine core gone")

        @ar._exit_on_engine_death
        def fine(self):
            return 7

    assert Fake().fine() == 7 and exits == []
    Fake().rollout()
    assert exits == [70]


def test_vllm_engine_refuses_a_lora_policy_before_starting(tmp_path):
    from t2dist.engines.vllm import VLLMEngineError

    with pytest.raises(VLLMEngineError, match="policy.kind=svf only"):
        make_engine(_cfg(tmp_path, "rollout.engine=vllm", "policy.kind=lora"))
