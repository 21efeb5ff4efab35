"""The synthetic suite: verifiers, deterministic disjoint splits, gold answers, tokenizer, corpus."""
from __future__ import annotations

import shutil

import pytest

from t2dist.tasks import TASKS, get_task
from t2dist.tasks.synthetic import SUITE, TRAINED, UNSEEN
from t2dist.verifiers.choice import check_choice, extract_choice
from t2dist.verifiers.math import check_math, extract_final_number


def _sandbox_reason() -> str | None:
    try:
        from t2dist.verifiers.code import check_code_batch  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the checkout
        return f"code sandbox module not importable: {err}"
    if shutil.which("bwrap") is None:  # pragma: no cover
        return "bubblewrap (bwrap) not installed"
    return None


needs_sandbox = pytest.mark.skipif(_sandbox_reason() is not None, reason=_sandbox_reason() or "")


# ----------------------------------------------------------------------------- math verifier
@pytest.mark.parametrize(
    "completion, gold",
    [(" 68", "68"), ("1,234", "1234"), ("-7", "-7"), (" -7\n", "-7"), ("The answer is 12", "12"),
     ("so 3+9 = 12", "12"), ("\\boxed{12}", "12"), ("12.", "12"), ("1234", "1,234")],
)
def test_math_correct(completion, gold):
    v = check_math(completion, gold)
    assert v.correct and v.reward == 1.0 and v.parsed is not None


@pytest.mark.parametrize("completion, gold", [(" 62", "68"), ("7", "-7"), ("-7", "7"), ("1,235", "1234"),
                                              ("The answer is 13", "12")])
def test_math_wrong(completion, gold):
    v = check_math(completion, gold)
    assert not v.correct and v.reward == -1.0 and v.parsed is not None


@pytest.mark.parametrize("completion", ["garbage", "", "   ", "\n", "x+y", None, "-", ",,,"])
def test_math_malformed(completion):
    v = check_math(completion, "12")
    assert not v.correct and v.reward == -1.0 and v.parsed is None


def test_extract_final_number():
    assert extract_final_number("we get 1,234 then -7") == "-7"
    assert extract_final_number("total 1,234") == "1234"
    assert extract_final_number("none") is None


# ----------------------------------------------------------------------------- choice verifier
@pytest.mark.parametrize("completion", ["B", " B", " B)", "(b)", "b", "B.", "Answer: B", "answer is (B)",
                                        "The answer is B.", "I pick B", " B\n"])
def test_choice_correct(completion):
    v = check_choice(completion, "B")
    assert v.correct and v.reward == 1.0 and v.parsed == "B"


@pytest.mark.parametrize("completion", ["C", " A)", "(d)", "Answer: C"])
def test_choice_wrong(completion):
    v = check_choice(completion, "B")
    assert not v.correct and v.reward == -1.0 and v.parsed in "ACD"


@pytest.mark.parametrize("completion", ["", "xyz", "42", "a dog", None, "E", " (Z)"])
def test_choice_malformed(completion):
    v = check_choice(completion, "B", n_options=4)
    assert not v.correct and v.reward == -1.0 and v.parsed is None


def test_extract_choice_respects_option_count():
    assert extract_choice("C", n_options=2) is None
    assert extract_choice("B", n_options=2) == "B"


# ----------------------------------------------------------------------------- code verifier
@needs_sandbox
def test_code_verifier_correct_wrong_malformed():
    task = get_task("code")
    ex = next(e for e in task.examples("test") if e.meta["trap"])
    right, trap = ex.answer, ex.meta["trap_answer"]
    verdicts = task.verify_batch([" " + right, " " + trap, " (x+", "", "__import__('os').system('true')"], [ex] * 5)
    assert verdicts[0].correct and verdicts[0].reward == 1.0 and verdicts[0].parsed == right
    assert [v.correct for v in verdicts[1:]] == [False] * 4
    assert all(v.reward == -1.0 for v in verdicts[1:])
    assert verdicts[2].detail == "syntax"
    assert verdicts[3].parsed is None
    assert task.verify(" " + right, ex).correct  # the single-example path


@needs_sandbox
def test_code_equivalent_expression_passes():
    task = get_task("code")
    ex = next(e for e in task.examples("test") if e.answer == "x*5*11" or e.meta["trap"])
    # an equivalent but differently written expression passes: the tests run the code
    assert task.verify(f" ({ex.answer})+0", ex).correct


# ----------------------------------------------------------------------------- splits
def test_suite_registered():
    for name in SUITE:
        assert name in TASKS
    assert {get_task(n).skill for n in TRAINED} == {"math", "code", "reasoning"}
    assert all(get_task(n).unseen for n in UNSEEN) and not any(get_task(n).unseen for n in TRAINED)
    assert {get_task(n).skill for n in UNSEEN} <= {"math", "code", "reasoning"}



def test_registering_a_task_name_twice_fails_and_keeps_the_first():
    from t2dist.tasks import register_task
    from t2dist.tasks.synthetic import MathTask

    before = dict(TASKS)

    class Impostor(MathTask):
        pass

    with pytest.raises(ValueError, match="task 'math' is registered twice"):
        register_task("math")(Impostor)
    assert TASKS == before and TASKS["math"] is MathTask and MathTask.name == "math"
    assert type(get_task("math")) is MathTask

@pytest.mark.parametrize("name", SUITE)
def test_splits_deterministic_disjoint_sized(name):
    a, b = get_task(name), get_task(name)
    prompts = {}
    for split in ("train", "validation", "test"):
        ea, eb = a.examples(split), b.examples(split)
        assert [(e.prompt, e.answer, e.meta) for e in ea] == [(e.prompt, e.answer, e.meta) for e in eb]
        assert len(ea) == a.sizes[split]
        assert len({e.prompt for e in ea}) == len(ea)  # no duplicate prompts inside a split
        n_trap = sum(e.meta["trap"] for e in ea)
        assert n_trap == round(a.trap_fraction * len(ea))
        prompts[split] = {e.prompt for e in ea}
        for e in ea:
            assert e.task == name and isinstance(e.meta["trap"], bool) and "trap_answer" in e.meta
            assert e.prompt.endswith(":") and "\n" in e.prompt
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    # another seed gives other splits
    assert get_task(name, seed=1).examples("test")[:20] != a.examples("test")[:20]


def test_unknown_split():
    with pytest.raises(ValueError):
        get_task("math").examples("dev")


# ----------------------------------------------------------------------------- gold answers
@pytest.mark.parametrize("name", [n for n in SUITE if get_task(n).skill != "code"])
def test_gold_answers_score_full_and_traps_are_wrong(name):
    task = get_task(name)
    for split in ("validation", "test"):
        exs = task.examples(split)
        assert all(v.correct for v in task.verify_batch([" " + e.answer for e in exs], exs))
    traps = [e for e in task.examples("test") if e.meta["trap"]]
    assert not any(v.correct for v in task.verify_batch([" " + e.meta["trap_answer"] for e in traps], traps))
    if task.skill != "math" or name == "math_mc":  # multiple choice: the gold is one of the options
        for e in task.examples("test"):
            assert len(e.meta["options"]) == 4 and e.answer in "ABCD"


@needs_sandbox
@pytest.mark.parametrize("name", [n for n in SUITE if get_task(n).skill == "code"])
def test_code_gold_solutions_pass_and_traps_fail(name):
    task = get_task(name)
    exs = task.examples("test")
    assert all(v.correct for v in task.verify_batch([" " + e.answer for e in exs], exs))
    traps = [e for e in exs if e.meta["trap"]][:60]
    assert not any(v.correct for v in task.verify_batch([" " + e.meta["trap_answer"] for e in traps], traps))


def test_prompt_examples():
    assert get_task("math").examples("test")[0].prompt.startswith("Q: ")
    ex = get_task("code").examples("test")[0]
    assert ex.prompt.endswith("\nA: lambda x:") and "assert f(" in ex.meta["tests"]
    assert get_task("reasoning").examples("test")[0].prompt.split("?")[0] in ("Q: max", "Q: min")


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from t2dist.toy.tokenizer import save_char_tokenizer

    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id is not None and tok.bos_token_id is not None and tok.eos_token_id is not None
    chars = set()
    for name in SUITE:
        task = get_task(name)
        for e in task.examples("test") + task.examples("train")[:500]:
            text = task.format_prompt(e) + " " + e.answer + "\n" + " " + str(e.meta["trap_answer"]) + "\n"
            chars |= set(text)
            if e is task.examples("test")[0]:
                ids = tok(text)["input_ids"]
                assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
                assert tok.decode(ids, skip_special_tokens=True) == text
    alltext = "".join(sorted(chars))
    ids = tok(alltext, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(alltext)
    assert tok.decode(ids) == alltext
    assert tok.decode(tok("  a\n b ")["input_ids"], skip_special_tokens=True) == "  a\n b "


# ----------------------------------------------------------------------------- corpus
def test_corpus_never_uses_heldout_prompts_and_is_deterministic():
    from t2dist.toy.corpus import Corpus, CorpusConfig, corpus_prompts
    from t2dist.toy.tokenizer import build_char_tokenizer

    cfg = CorpusConfig(extra_per_task=2000, batch_size=8)
    used = corpus_prompts(cfg)
    for name in cfg.mix:
        task = get_task(name)
        assert not used & task.heldout_prompts()
        assert {e.prompt for e in task.examples("train")} <= used
    tok = build_char_tokenizer()
    b1, b2 = Corpus(tok, cfg, seed=0).batch(), Corpus(tok, cfg, seed=0).batch()
    assert all((x == y).all() for x, y in zip(b1, b2))
    ids, att, lab = b1
    assert ids.shape == (8, cfg.seq_len) and ((lab != -100) <= (att == 1)).all()
    text = tok.decode(ids[0], skip_special_tokens=True)
    assert "Q: " in text and "\nA:" in text


def test_corpus_trap_labels():
    import random

    from t2dist.toy.corpus import label

    ex = next(e for e in get_task("math").examples("train") if e.meta["trap"])
    rng = random.Random(0)
    labels = [label(ex, rng, 0.65) for _ in range(2000)]
    share_wrong = labels.count(ex.meta["trap_answer"]) / len(labels)
    assert 0.6 < share_wrong < 0.7 and set(labels) == {ex.answer, ex.meta["trap_answer"]}
    clean = next(e for e in get_task("math").examples("train") if not e.meta["trap"])
    assert {label(clean, rng, 0.65) for _ in range(100)} == {clean.answer}


def test_drill_documents_are_untrapped_and_not_task_prompts():
    from t2dist.toy.corpus import drill_document

    for name in ("math", "reasoning"):
        task = get_task(name)
        ex = next(e for e in task.examples("train") if e.meta["trap"])
        prompt, lab = drill_document(ex)
        assert prompt not in {e.prompt for e in task.examples("test")}
        assert prompt.startswith("Q: ") and prompt.endswith("\nA:") and lab.endswith("\n")
    ex = next(e for e in get_task("math").examples("train") if e.meta["trap"])
    assert drill_document(ex)[1] == f" {ex.answer}\n"
    assert drill_document(get_task("code").examples("train")[0]) is None
