"""The checked-in toy base, generation, evaluation and the build pipeline."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from t2dist.evaluation.accuracy import evaluate, wilson_interval  # noqa: E402
from t2dist.engines.generation import generate  # noqa: E402
from t2dist.engines.in_process import base_model_engine  # noqa: E402
from t2dist.tasks import get_task  # noqa: E402
from t2dist.tasks.synthetic import TRAINED, UNSEEN  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "t2dist" / "assets" / "toy-base"
needs_asset = pytest.mark.skipif(not (ASSET / "config.json").exists(), reason=f"toy base not built at {ASSET}")


def _has_sandbox() -> bool:
    try:
        from t2dist.verifiers.code import check_code_batch  # noqa: F401
    except Exception:
        return False
    import shutil

    return shutil.which("bwrap") is not None


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(ASSET).eval()
    tok = AutoTokenizer.from_pretrained(ASSET)
    return model, tok


# ----------------------------------------------------------------------------- evaluation maths
def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and math.isclose(lo + hi, 1.0, abs_tol=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 1.0
    assert math.isclose(wilson_interval(57, 100)[0], 0.4721, abs_tol=1e-3)


# ----------------------------------------------------------------------------- the checked-in model
@needs_asset
def test_asset_loads_and_is_small(toy):
    model, tok = toy
    size = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    assert size <= 5 * 1024 * 1024
    assert (ASSET / "model.safetensors").exists()
    info = json.loads((ASSET / "toy_base.json").read_text())
    assert info["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32


@needs_asset
def test_generation_batching_grouping_and_ids(toy):
    model, tok = toy
    task = get_task("math")
    prompts = [task.format_prompt(e) for e in task.examples("test")[:12]] + ["Q: add 3, mul 4\nA: lambda x:"]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=64)
    single = [generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]  # left padding changes nothing
    nl = tok.convert_tokens_to_ids("\n")
    for i, c in enumerate(batched):
        assert c.prompt_index == i and "\n" not in c.text
        assert c.prompt_ids == tok(prompts[i])["input_ids"]
        assert tok.pad_token_id not in c.completion_ids
        if c.stopped:
            assert c.completion_ids[-1] == nl and tok.decode(c.completion_ids[:-1]) == c.text
    # sampling: grouped per prompt, reproducible with a seed
    s1 = generate(model, tok, prompts[:3], num_samples=5, temperature=1.0, max_new_tokens=8, seed=7, batch_size=4)
    s2 = generate(model, tok, prompts[:3], num_samples=5, temperature=1.0, max_new_tokens=8, seed=7, batch_size=4)
    assert [c.prompt_index for c in s1] == [0] * 5 + [1] * 5 + [2] * 5
    assert [c.text for c in s1] == [c.text for c in s2]  # same seed and batch size: same samples
    # max_new_tokens without a stop: not stopped, exactly that many tokens
    c = generate(model, tok, prompts[:1], max_new_tokens=2, stop=("@",))[0]
    assert len(c.completion_ids) <= 2 and (c.stopped or len(c.completion_ids) == 2)


@needs_asset
def test_generation_without_pad_token(toy):
    model, tok = toy
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(ASSET)
    tok2.pad_token = None
    prompts = ["Q: 12+34=\nA:", "Q: max? A)11 B)99 C)12 D)13\nA:"]
    a = generate(model, tok, prompts, max_new_tokens=6)
    b = generate(model, tok2, prompts, max_new_tokens=6)
    assert [x.text for x in a] == [x.text for x in b]


def _band_eval(model, tok, name):
    task = get_task(name)
    if task.skill == "code" and not _has_sandbox():
        pytest.skip("code sandbox (t2dist.verifiers.code + bwrap) not available")
    return evaluate(base_model_engine(model, tok), task, "test", records=True)


@needs_asset
@pytest.mark.parametrize("name", TRAINED)
def test_trained_skill_accuracy_in_band(toy, name):
    model, tok = toy
    res = _band_eval(model, tok, name)
    assert res.n == 400 and res.correct == round(res.accuracy * res.n)
    assert res.ci_low <= res.accuracy <= res.ci_high
    assert 0.40 <= res.accuracy <= 0.80, f"{name}: greedy test accuracy {res.accuracy:.3f} outside 40-80%"
    # the trap subset is where it fails: clean prompts are answered better than trap prompts
    trap = [r["correct"] for r in res.records if r["trap"]]
    clean = [r["correct"] for r in res.records if not r["trap"]]
    assert sum(clean) / len(clean) > sum(trap) / len(trap)


@needs_asset
@pytest.mark.parametrize("name", UNSEEN)
def test_unseen_variants_are_mediocre(toy, name):
    model, tok = toy
    res = _band_eval(model, tok, name)
    assert 0.15 <= res.accuracy <= 0.90, f"{name}: {res.accuracy:.3f}"


@needs_asset
@pytest.mark.parametrize("name", TRAINED)
def test_correct_answer_is_sampled_on_trap_prompts(toy, name):
    model, tok = toy
    task = get_task(name)
    if task.skill == "code" and not _has_sandbox():
        pytest.skip("code sandbox (t2dist.verifiers.code + bwrap) not available")
    exs = [e for e in task.examples("test") if e.meta["trap"]][:60]
    comps = generate(model, tok, [task.format_prompt(e) for e in exs], num_samples=8, temperature=1.0,
                     max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=256, seed=0)
    verdicts = task.verify_batch([c.text for c in comps], [e for e in exs for _ in range(8)])
    rate = sum(v.correct for v in verdicts) / len(verdicts)
    assert rate >= 0.10, f"{name}: correct in {rate:.3f} of samples on trap prompts"


# ----------------------------------------------------------------------------- the build pipeline
def test_build_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2dist.toy.build import build_toy_base
    from t2dist.toy.corpus import CorpusConfig

    out = build_toy_base(tmp_path / "tb", steps=3, seed=0, progress=False, measure_accuracy=False,
                         corpus_cfg=CorpusConfig(extra_per_task=500, batch_size=8))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    info = json.loads((out / "toy_base.json").read_text())
    assert info["training"]["steps"] == 3 and (out / "model.safetensors").exists()
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 0.95e6
    res = evaluate(base_model_engine(model, tok), "math", limit=8)
    assert res.n == 8
    # deterministic given the seed: a second build has identical weights
    from safetensors.torch import load_file

    again = build_toy_base(tmp_path / "tb2", steps=3, seed=0, progress=False, measure_accuracy=False,
                           corpus_cfg=CorpusConfig(extra_per_task=500, batch_size=8))
    w1, w2 = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@needs_asset
def test_base_is_a_mediocre_dispatch_classifier(toy):
    """The first pass: the base names the kind of a prompt, but fails on the dispatch trap subset."""
    model, tok = toy
    res = evaluate(base_model_engine(model, tok), get_task("dispatch"), "test", limit=400, records=True)
    assert 0.6 <= res.accuracy <= 0.97, f"dispatch: {res.accuracy:.3f}"
    trap = [r["correct"] for r in res.records if r["trap"]]
    clean = [r["correct"] for r in res.records if not r["trap"]]
    assert sum(clean) / len(clean) > sum(trap) / len(trap) + 0.2
