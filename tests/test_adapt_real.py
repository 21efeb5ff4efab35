"""The real-model two-pass: the sentiment and word tasks, ``mixed_real`` / ``dispatch_real``, per-example generation
settings and the first pass through a chat template (a recording engine, the toy SVF model)."""
from __future__ import annotations

import pytest
import torch

from t2dist.adapt.dispatch import parse_label
from t2dist.adapt.loading import first_pass
from t2dist.adapt.strategies import TwoPass
from t2dist.evaluation.accuracy import generate_grouped
from t2dist.experts.expert import Expert, make_card
from t2dist.engines.generation import Completion
from t2dist.svf.model import SVFModel
from t2dist.tasks import get_task
from t2dist.tasks.adaptation_real import REAL4_SOURCES, REAL4_TEMPLATE, REAL4_TOKENS, REAL_SOURCES, REAL_TEMPLATE, REAL_TOKENS

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_toy():
    """The toy SVF model and its tokenizer given a chat template (the toy tokenizer has none)."""
    from t2dist.models.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model("toy")
    svf, _ = SVFModel.from_pretrained_model(model, targets="mlp", cache_dir=None, model_name="toy")
    chat = type(tok).from_pretrained(tok.name_or_path)
    chat.chat_template = TEMPLATE
    chat.pad_token = chat.pad_token or chat.eos_token
    return svf, chat


# ----------------------------------------------------------------------------- the third tasks
def test_sentiment_labels_follow_every_clause_and_only_one_label_may_be_named():
    from t2dist.tasks.sentiment import NEGATIVE, POSITIVE

    task = get_task("sentiment")
    test, val, train = (task.examples(s) for s in ("test", "validation", "train"))
    assert (len(test), len(val), len(train)) == (400, 200, 1500)
    assert not {e.prompt for e in test} & {e.prompt for e in train + val}
    assert 0.4 < sum(e.answer == "positive" for e in test) / 400 < 0.6 and 0.3 < sum(e.meta["negated"] for e in test) / 400
    for e in test:  # independently: each clause's adjective, flipped by "not", gives the label
        review = e.prompt.split("\n")[0].removeprefix("Review: ").rstrip(".").lower()
        for part in review.split(" and "):
            words = part.split()
            polarity = words[-1] in POSITIVE
            assert polarity != (words[-1] in NEGATIVE)
            assert (polarity != ("not" in words)) == (e.answer == "positive"), e.prompt
    e = test[0]
    other = "negative" if e.answer == "positive" else "positive"
    assert task.verify(f" This review is {e.answer.upper()}.", e).correct and not task.verify(f" {other}", e).correct
    assert task.verify(" positive or negative", e).parsed is None  # echoing the question is no answer
    assert task.verify(f" {e.answer}ly", e).parsed is None and task.verify(f" fine\n{e.answer}", e).parsed is None
    assert all(task.verify(task.reference_completion(x), x).correct for x in test)


def test_alphabetical_answer_is_the_earlier_word_and_only_one_word_may_be_named():
    task = get_task("alphabetical")
    test, val, train = (task.examples(s) for s in ("test", "validation", "train"))
    assert (len(test), len(val), len(train)) == (400, 200, 1500)
    assert not {e.prompt for e in test} & {e.prompt for e in train + val}
    for e in test:
        a, b = e.meta["words"]
        assert a[0] != b[0] and e.answer == sorted([a, b])[0] and f"{a} or {b}?" in e.prompt
    e = next(x for x in test if x.answer == x.meta["words"][1])  # the right word is the second one
    a, b = e.meta["words"]
    assert task.verify(f" {b}", e).correct and task.verify(f"The answer is {b.upper()}.", e).correct
    assert not task.verify(f" {a}", e).correct
    assert task.verify(f" {a} or {b}", e).parsed is None  # both named: no answer, even with the right one in it
    assert task.verify(f" {b}s", e).parsed is None  # a longer word is not the word
    assert task.verify(f" xyz\n{b}", e).parsed is None  # only the first line counts
    assert all(task.verify(task.reference_completion(x), x).correct for x in test)


# ----------------------------------------------------------------------------- mixed_real / dispatch_real
def test_mixed_real_writes_generates_and_scores_each_example_as_its_source_task(chat_toy):
    _, tok = chat_toy
    mixed = get_task("mixed_real")
    exs = mixed.examples("test")
    assert [e.task for e in exs[:3]] == list(REAL_SOURCES) and len(exs) == 3 * 400
    for e in exs[:30]:
        src = get_task(e.task)
        assert mixed.prompt_for(e, tok) == src.prompt_for(e, tok) == f"<user>{src.format_prompt(e)}<assistant>"
        assert mixed.generation_for(e) == (REAL_TOKENS[e.task], tuple(src.stop))
    assert mixed.generation_for(exs[1])[0] == 1  # ARC-Easy: one letter, as its expert was trained
    answers = [" " + e.answer for e in exs[:30]]
    want = [get_task(e.task).verify(a, e).correct for a, e in zip(answers, exs[:30])]
    assert [v.correct for v in mixed.verify_batch(answers, exs[:30])] == want and all(want)


def test_dispatch_real_asks_about_the_users_text_and_reads_synonyms():
    task = get_task("dispatch_real")
    assert task.categories == ("math", "reasoning", "sentiment", "other") and task.chat == "auto"
    test = task.examples("test")
    assert {e.answer for e in test} == {"math", "reasoning", "sentiment"} and len(test) == 400 + 1150 + 400
    for e in test[:20]:
        src = get_task(e.meta["source_task"])
        assert e.answer == REAL_SOURCES[src.name]
        assert e.prompt == REAL_TEMPLATE.format(prompt=e.meta["source_prompt"])
    assert not task.heldout_prompts() & {e.prompt for e in task.examples("train")}
    arc = next(e for e in test if e.answer == "reasoning")
    assert task.verify(" Science.", arc).correct and task.verify("This is a science question.", arc).correct
    assert not task.verify(" math", arc).correct
    review = next(e for e in test if e.answer == "sentiment")
    assert task.verify(" Review", review).correct and task.verify(" sentiment", review).correct
    assert parse_label(" science", ("math", "code", "reasoning", "other")) == "reasoning"


def test_the_fourth_kind_code_in_mixed_real4_and_dispatch_real4(chat_toy):
    """pyfunc joins as the fourth kind, written, generated and verified (in the sandbox) as its own task does;
    the three-kind tasks stay as they were (a classifier expert was trained on dispatch_real's text)."""
    _, tok = chat_toy
    mixed = get_task("mixed_real4")
    exs = mixed.examples("test")
    assert [e.task for e in exs[:4]] == list(REAL4_SOURCES) == ["arith", "arc_easy", "sentiment", "pyfunc"]
    assert len(exs) == 4 * 400 and mixed.max_new_tokens == REAL4_TOKENS["pyfunc"] == 96
    code = [e for e in exs[:40] if e.task == "pyfunc"]
    pyfunc = get_task("pyfunc")
    for e in code:
        assert mixed.prompt_for(e, tok) == pyfunc.prompt_for(e, tok) and mixed.prompt_for(e, tok).endswith("```python\n")
        assert mixed.generation_for(e) == (96, pyfunc.stop)
    answers = [pyfunc.reference_completion(e) for e in code] + ["    return None\n"]
    verdicts = mixed.verify_batch(answers, code + code[:1])
    assert [v.correct for v in verdicts] == [True] * len(code) + [False]
    assert get_task("mixed_real").examples("test")[:3] == exs[:3]  # the three kinds' examples are the same

    disp = get_task("dispatch_real4")
    assert disp.categories == ("math", "reasoning", "sentiment", "code", "other")
    test = disp.examples("test")
    assert len(test) == 400 + 1150 + 400 + 400 and {e.answer for e in test} == {"math", "reasoning", "sentiment", "code"}
    prog = next(e for e in test if e.answer == "code")
    assert prog.prompt == REAL4_TEMPLATE.format(prompt=prog.meta["source_prompt"])
    assert prog.meta["source_prompt"] == pyfunc.format_prompt(next(x for x in pyfunc.examples("test")
                                                                   if x.prompt in prog.meta["source_prompt"]))
    assert disp.verify(" programming task.", prog).correct and disp.verify(" Python function", prog).correct
    assert disp.verify(" code", prog).correct and not disp.verify(" math problem", prog).correct
    assert get_task("dispatch_real").template == REAL_TEMPLATE and "programming" not in REAL_TEMPLATE
    assert "pyfunc" not in {e.meta["source_task"] for e in get_task("dispatch_real").examples("validation")}


def test_generate_grouped_calls_once_per_setting_and_keeps_the_order():
    calls = []

    def gen(ps, n, stop):
        calls.append((list(ps), n, stop))
        return [f"{p}/{n}" for p in ps]

    settings = [(3, ("\n",)), (1, ("\n",)), (3, ("\n",)), (3, ()), (1, ("\n",))]
    out = generate_grouped(gen, list("abcde"), settings)
    assert out == ["a/3", "b/1", "c/3", "d/3", "e/1"]
    assert sorted((tuple(p), n, s) for p, n, s in calls) == sorted(
        [(("a", "c"), 3, ("\n",)), (("b", "e"), 1, ("\n",)), (("d",), 3, ())])


# ----------------------------------------------------------------------------- the two passes
class RecordingEngine:
    """Answers the dispatch question with the source's category and records every generate call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[tuple[object, list[str], int]] = []
        self.z = None

    @property
    def version(self):
        return self.z

    def set_z(self, z, key=None):
        self.z = key

    def unset_z(self):
        self.z = None

    def generate(self, prompts, *, temperature=0.0, max_new_tokens=32, stop=("\n",), **kw):
        self.calls.append((self.z, list(prompts), max_new_tokens))
        out = []
        for i, p in enumerate(prompts):
            if p.startswith("<user>What kind of text"):
                text = " Science" if "Question:" in p else " review" if "Review:" in p else " math"
            else:
                text = " x"
            out.append(Completion(i, text, [], []))
        return out


def test_two_pass_asks_through_the_chat_template_and_answers_with_each_sources_limits(chat_toy):
    svf, tok = chat_toy
    experts = {c: Expert(z=svf.neutral_z(), card=make_card(svf, name=c, task=t, base_model="toy"))
               for t, c in REAL_SOURCES.items()}
    engine = RecordingEngine(tok)
    disp = get_task("dispatch_real")
    tp = TwoPass(svf, tok, experts, template=REAL_TEMPLATE, engine=engine, **first_pass(disp))  # as build_two_pass
    task = get_task("mixed_real")
    exs = task.examples("test")[:9]
    run = tp.run(task, exs, "prompt")
    assert run.labels == [REAL_SOURCES[e.task] for e in exs] == run.gold_labels
    first = engine.calls[0]
    assert first[0] is None  # the base model answers the dispatch question
    assert first[2] == disp.max_new_tokens == 4  # the label is the first word after "It is a"
    want = [f"<user>{REAL_TEMPLATE.format(prompt=task.format_prompt(e))}<assistant>{disp.answer_prefix}" for e in exs]
    assert first[1] == want
    # exactly the text the classifier expert was trained on (dispatch_real's own prompt)
    assert want == [disp.prompt_for(disp.wrap(e), tok) for e in exs]
    seconds = {(z[1], n): ps for z, ps, n in engine.calls[1:]}  # (expert category, max_new_tokens) -> prompts
    want = {(REAL_SOURCES[e.task], REAL_TOKENS[e.task]) for e in exs}
    assert set(seconds) == want and len(engine.calls) == 1 + len(want)
    for e in exs:
        assert task.prompt_for(e, tok) in seconds[(REAL_SOURCES[e.task], REAL_TOKENS[e.task])]


def test_config_names_a_bad_dispatch_task_or_template_before_any_model_work():
    from t2dist.adapt.loading import dispatch_template
    from t2dist.config import ConfigError, load_config

    cfg = load_config(None, ["adapt.dispatch_task=dispatch_real"])
    assert dispatch_template(cfg) == REAL_TEMPLATE  # null template: the dispatch task's own
    assert dispatch_template(load_config(None, [])) == get_task("dispatch").template
    assert dispatch_template(load_config(None, ["adapt.template=Kind of {prompt}?"])) == "Kind of {prompt}?"
    with pytest.raises(ConfigError, match="adapt.dispatch_task.*dispatch, dispatch_real"):
        load_config(None, ["adapt.dispatch_task=mixed_real"])
    with pytest.raises(ConfigError, match="adapt.template"):
        load_config(None, ["adapt.template=no field"])
