"""Two-pass self-adaptation: label parsing, grouping by label, CEM, an end-to-end run, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2dist.adapt.cem import CEMSettings, cem_search
from t2dist.adapt.dispatch import DEFAULT_TEMPLATE, DispatchError, check_template, parse_label
from t2dist.adapt.strategies import AdaptError, TwoPass, check_expert_set, pick_shots
from t2dist.experts.expert import Expert, make_card, save_expert
from t2dist.svf.model import SVFModel, mix_z

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- first pass: parsing
@pytest.mark.parametrize("text,label", [
    (" math", "math"), ("MATH\n", "math"), ("  Code.", "code"), (" reas", "reasoning"), ("ma", "math"),
    (" other", "other"), ("", "other"), (None, "other"), (" ???", "other"), (" chess", "other"),
    (" c", "other"),  # one letter is too short to count as a prefix
    (" co", "code"), (" Programming", "code"), (" it is math", "math"), ("reasoning\nmath", "reasoning"),
])
def test_parse_label(text, label):
    assert parse_label(text) == label


def test_parse_label_with_custom_categories_and_template():
    assert parse_label(" mat", ["math", "code"]) == "math"
    assert parse_label(" reasoning", ["math", "code", "other"]) == "other"  # not an offered category
    assert check_template("Kind of {prompt}?") == "Kind of {prompt}?"
    for bad in ("no field", "{prompt} {prompt}", "{prompt} {other}"):
        with pytest.raises(DispatchError, match="template"):
            check_template(bad)


def test_dispatch_task_labels_and_trap_subset():
    from t2dist.tasks import get_task

    task = get_task("dispatch")
    test = task.examples("test")
    assert {e.answer for e in test} == {"math", "code", "reasoning", "other"}
    assert all(e.prompt == DEFAULT_TEMPLATE.format(prompt=e.meta["source_prompt"]) for e in test)
    trap = [e for e in test if e.meta["trap"]]
    assert 0.1 < len(trap) / len(test) < 0.4 and all(e.meta["trap_answer"] != e.answer for e in trap)
    assert not task.heldout_prompts() & {e.prompt for e in task.examples("train")}
    assert task.verify(" Reas", test[0]).correct == (test[0].answer == "reasoning")
    mixed = get_task("mixed").examples("test")
    assert [e.task for e in mixed[:3]] == ["math", "code", "reasoning"] and len(mixed) == 1200


# ----------------------------------------------------------------------------- CEM
def test_cem_finds_a_known_optimum():
    target = torch.tensor([0.2, 0.7, -0.3])
    calls = []

    def score(cands):
        calls.append(len(cands))
        return [-float(((c - target) ** 2).sum()) for c in cands]

    res = cem_search(3, score, CEMSettings(population=32, elite_frac=0.2, iterations=60, init_std=0.5, patience=60,
                                           seed_experts=False, seed=1))
    assert torch.allclose(res.alpha, target, atol=0.05), res.alpha
    assert res.evaluations == sum(calls) and all(n == 32 for n in calls)
    assert [t["best"] for t in res.trace] == sorted(t["best"] for t in res.trace)  # best never gets worse


def test_cem_seeds_single_experts_and_keeps_them_on_ties():
    first = []

    def plateau(cands):  # only the single expert 2 scores; everything else is 0
        if not first:
            first.extend(c.clone() for c in cands)
        return [1.0 if torch.equal(c, torch.tensor([0.0, 0.0, 1.0])) else 0.0 for c in cands]

    res = cem_search(3, plateau, CEMSettings(population=8, iterations=4, patience=2, seed=0))
    assert all(torch.equal(first[k], torch.eye(3)[k]) for k in range(3))
    assert torch.equal(res.alpha, torch.tensor([0.0, 0.0, 1.0])) and res.score == 1.0
    assert res.iterations == 3  # early stop: no better candidate for `patience` iterations
    # per-matrix: alpha is (K, T), seeds are one-hot broadcast over matrices
    seen = []
    res = cem_search(2, lambda cs: seen.extend(cs) or [0.0] * len(cs),
                     CEMSettings(population=4, iterations=1, per_matrix=True), num_matrices=5)
    assert res.alpha.shape == (2, 5) and torch.equal(seen[1], torch.stack([torch.zeros(5), torch.ones(5)]))



def test_cem_settings_have_one_source_the_run_config():
    """CEM run without settings (``TwoPass.run``, ``cem_search``) uses the config's defaults: 50 shots, not 10."""
    from t2dist.config import load_config

    default = load_config(None, []).adapt.cem
    assert CEMSettings() == default and CEMSettings().shots == 50
    cfg = load_config(None, ["adapt.cem.shots=7", "adapt.cem.population=5"])
    from t2dist.adapt.loading import cem_settings

    assert cem_settings(cfg).shots == 7 and cem_settings(cfg).population == 5
    with pytest.raises(ValueError, match="population"):
        CEMSettings(population=1)

# ----------------------------------------------------------------------------- models and experts
@pytest.fixture(scope="module")
def toy():
    from t2dist.models.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model("toy")
    svf, _ = SVFModel.from_pretrained_model(model, targets="mlp", cache_dir=None, model_name="toy")
    return svf, tok


def _expert(svf, name, task, z):
    return Expert(z=z, card=make_card(svf, name=name, task=task, base_model="toy"))


def _random_expert(svf, name, task, seed):
    g = torch.Generator().manual_seed(seed)
    return _expert(svf, name, task, {n: 1 + 0.3 * torch.randn(v.shape, generator=g) for n, v in svf.neutral_z().items()})


def test_grouping_composes_each_expert_once_per_batch(toy):
    svf, tok = toy
    experts = {c: _random_expert(svf, c, c, i) for i, c in enumerate(("math", "code", "reasoning"))}
    tp = TwoPass(svf, tok, experts)
    merges = []
    real_merge = svf.merge_
    svf.merge_ = lambda z, version=True: (merges.append(version), real_merge(z, version))[1]
    try:
        prompts = [f"Q: {i}+1=\nA:" for i in range(12)]
        labels = ["math", "code", "other", "reasoning", "math", "code"] * 2
        got = tp.answer(prompts, labels, max_new_tokens=5)
        assert len(merges) == 3 and len(set(merges)) == 3  # math, code, reasoning once each; other = base
        # independent: each prompt answered alone with its label's weights
        for p, lab, text in zip(prompts, labels, got):
            if lab == "other":
                svf.unmerge_()
            else:
                real_merge(experts[lab].z)
            from t2dist.engines.generation import generate

            assert generate(svf.model, tok, [p], max_new_tokens=5)[0].text == text
        tp.reset()
        merges.clear()
        tp.answer(prompts, ["math"] * 12, max_new_tokens=5)
        tp.answer(prompts, ["math"] * 12, max_new_tokens=5)
        assert len(merges) == 1  # the next batch with the same expert composes nothing
    finally:
        svf.merge_ = real_merge
        svf.unmerge_()


def test_two_pass_objects_on_one_policy_never_take_each_others_weights(toy):
    """The engine's version is the truth of what it holds; each TwoPass tags the versions it sets, so a second
    TwoPass over the same policy with an ``("expert", "math")`` of its own composes its own weights."""
    from t2dist.engines.generation import generate

    svf, tok = toy
    a = TwoPass(svf, tok, {"math": _random_expert(svf, "math", "math", 0)})
    b = TwoPass(svf, tok, {"math": _random_expert(svf, "math", "math", 5)})
    prompts = [f"Q: {i}+{2 * i}=\nA:" for i in range(16)]
    try:
        got_a = a.answer(prompts, ["math"] * 16, max_new_tokens=5)
        assert a.current == ("expert", "math")
        got_b = b.answer(prompts, ["math"] * 16, max_new_tokens=5)
        assert b.merges == 1 and a.current is not None and a.current != ("expert", "math")  # b's weights now
        svf.merge_(b.experts["math"].z)
        assert [c.text for c in generate(svf.model, tok, prompts, max_new_tokens=5)] == got_b != got_a
    finally:
        svf.unmerge_()


def test_bad_input_is_refused_before_any_work(toy, tmp_path):
    svf, tok = toy
    a = _random_expert(svf, "math", "math", 0)
    b = _random_expert(svf, "code", "code", 1)
    b.card["base_fingerprint"] = "0" * 16
    b.card["base_model"] = "other-base"
    with pytest.raises(AdaptError, match="different base models"):
        check_expert_set({"math": a, "code": b})
    with pytest.raises(AdaptError, match="at least one expert"):
        check_expert_set({})
    lora = _random_expert(svf, "math-lora", "math", 2)
    lora.card["kind"] = "lora"
    with pytest.raises(AdaptError, match="'math-lora' is a lora expert"):
        check_expert_set({"math": a, "math-lora": lora})
    from t2dist.adapt.loading import read_experts
    from t2dist.registry import Registry

    reg = Registry(tmp_path / "reg", create=True)
    reg.publish(a.z, a.card)
    with pytest.raises(AdaptError, match="unknown expert 'chess'"):
        read_experts(["math", "chess"], str(tmp_path / "reg"))
    from t2dist.tasks import get_task

    with pytest.raises(AdaptError, match="fewer than adapt.cem.shots=500"):
        pick_shots(get_task("math"), 500, split="validation")
    # the CLI says it in one line, exit 2, before loading a model
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "t2dist", "adapt", "--registry", str(tmp_path / "reg"),
                           "--experts", "math,chess", "--task", "math"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "unknown expert 'chess'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "t2dist", "adapt", "--registry", str(tmp_path / "reg"),
                           "--experts", "math", "--strategy", "fewshot", "--task", "math",
                           "adapt.cem.shots_split=validation", "adapt.cem.shots=201"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "200 validation examples, fewer than adapt.cem.shots=201" in proc.stderr


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(toy):
    """Two tiny real experts (math, code), a few RL steps each with train_local."""
    from t2dist.config import load_config
    from t2dist.engines.hf import HFEngine
    from t2dist.rl.local import train_local
    from t2dist.tasks import get_task

    svf, tok = toy
    out = {}
    for task in ("math", "code"):
        cfg = load_config(None, [f"task.name={task}", "rl.steps=6", "rl.prompts_per_step=8", "rl.lr=0.02"])
        run = train_local(cfg, HFEngine(cfg, policy=svf, tokenizer=tok), get_task(task), progress=False)
        out[task] = _expert(svf, task, task, run.z)
    return out


def test_two_pass_end_to_end_matches_an_independent_computation(toy, trained, tmp_path):
    from t2dist.adapt.dispatch import dispatch_prompt
    from t2dist.engines.generation import generate
    from t2dist.tasks import get_task

    svf, tok = toy
    tp = TwoPass(svf, tok, trained, cls_expert=trained["code"])
    task = get_task("mixed")
    exs = task.examples("test")[:30]
    run = tp.run(task, exs, "prompt")
    # independently: the base labels each prompt, then each prompt is answered alone with its expert
    svf.unmerge_()
    first = generate(svf.model, tok, [dispatch_prompt(e.prompt) for e in exs], max_new_tokens=10)
    labels = [parse_label(c.text, ["math", "code", "other"]) for c in first]
    assert run.labels == labels
    ok = []
    for e, lab in zip(exs, labels):
        if lab == "other":
            svf.unmerge_()
        else:
            svf.merge_(trained[lab].z)
        text = generate(svf.model, tok, [e.prompt], max_new_tokens=task.max_new_tokens)[0].text
        ok.append(task.verify(text, e).correct)
    svf.unmerge_()
    assert run.correct == ok
    gold = [{"math": "math", "code": "code"}.get(e.task, "other") for e in exs]
    assert run.dispatch_accuracy == pytest.approx(sum(a == b for a, b in zip(labels, gold)) / len(exs))
    assert run.merges <= 2 + 0  # at most one composition per expert (prompt dispatch uses the base)
    # cls strategy: the first pass runs with the classifier expert's weights
    run_cls = tp.run(task, exs[:6], "cls")
    assert len(run_cls.labels) == 6 and run_cls.first_pass_s > 0


def test_fewshot_mixture_is_published_with_alpha_and_trace(toy, trained, tmp_path):
    from actors.adapt import AdaptWorker
    from t2dist.adapt.loading import cem_settings
    from t2dist.orchestration.adapt import publish_mixture
    from t2dist.config import load_config
    from t2dist.registry import Registry
    from t2dist.tasks import get_task

    svf, tok = toy
    cfg = load_config(None, ["adapt.cem.population=6", "adapt.cem.iterations=2", "adapt.cem.shots=8",
                             f"svf.cache_dir={tmp_path / 'f'}", "rollout.threads_per_actor=1"])
    tp = TwoPass(svf, tok, trained)
    task = get_task("code3")
    shots = pick_shots(task, 8)
    s = cem_settings(cfg)
    res = tp.fewshot(task, shots, s)
    assert res.evaluations == 12 and len(res.trace) == 2 and res.alpha.shape == (2,)
    # the actor-side scorer gives the same scores as the in-process one (same merged W')
    worker = AdaptWorker(cfg)
    worker.set_experts([e.z for e in trained.values()])
    cands = [torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.8])]
    assert worker.score_mixtures(cands, "code3", shots) == tp.mixture_evaluator(task, shots)(cands)
    ref = publish_mixture(tp, cfg, ["math", "code"], res, task, str(tmp_path / "reg"))
    loaded = Registry(tmp_path / "reg").load(ref)
    mix = loaded.card["mixture"]
    assert mix["experts"] == ["math", "code"] and mix["alpha"] == res.alpha.tolist() and len(mix["trace"]) == 2
    want = mix_z([e.z for e in trained.values()], res.alpha)
    assert all(torch.allclose(loaded.z[k], want[k]) for k in want)
    svf.unmerge_()


def test_adaptation_table_rows_and_per_task_parts_match_a_direct_computation(toy, trained, tmp_path):
    from t2dist.orchestration.adapt import adaptation_table
    from t2dist.config import load_config
    from t2dist.engines.generation import generate
    from t2dist.tasks import get_task

    svf, tok = toy
    refs = []
    for name, e in trained.items():
        save_expert(tmp_path / name, e.z, e.card)
        refs.append(str(tmp_path / name))
    cfg = load_config(None, [f"svf.cache_dir={tmp_path / 'f'}"])
    md, raw = adaptation_table(cfg, refs, None, None, ["mixed"], limit=12, log=lambda m: None, strategies=["prompt"])
    res = raw["results"]
    assert list(res) == ["Base", "math expert", "code expert", "Prompt"] and "| Few-shot |" not in md
    task = get_task("mixed")
    exs = task.examples("test")[:12]
    svf.unmerge_()  # independently: the base answers each example alone
    texts = [generate(svf.model, tok, [e.prompt], max_new_tokens=task.max_new_tokens)[0].text for e in exs]
    want: dict[str, list[int]] = {}
    for e, t in zip(exs, texts):
        k = want.setdefault(e.task, [0, 0])
        k[0] += task.verify(t, e).correct
        k[1] += 1
    assert res["Base"]["mixed"]["by_task"] == want and res["Base"]["mixed"]["correct"] == sum(k for k, _ in want.values())
    for row in res.values():
        assert sum(n for _, n in row["mixed"]["by_task"].values()) == 12
    assert "mixed by source task:" in md and "| Prompt |" in md
    with pytest.raises(AdaptError, match="unknown strategies"):
        adaptation_table(cfg, refs, None, None, ["mixed"], limit=2, strategies=["oracle"])
