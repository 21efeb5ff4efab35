"""The arithmetic tasks for real models: deterministic prompt-disjoint splits, gold answers that match an
independent computation, a verifier that reads the last number, the oracle at 100%, chat vs plain prompts."""
import operator
import re

import pytest

from t2dist.tasks import get_task

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PROMPT = re.compile(r"^Q: What is (\d+) ([-+*]) (\d+)\?\nA:$")


@pytest.mark.parametrize("name", ["arith", "arith_hard"])
def test_splits_are_deterministic_disjoint_and_correct(name):
    a, b = get_task(name), get_task(name)
    sizes = {s: len(a.examples(s)) for s in ("train", "validation", "test")}
    assert sizes == a.sizes
    seen = set()
    for split in ("train", "validation", "test"):
        exs = a.examples(split)
        assert [e.prompt for e in exs] == [e.prompt for e in b.examples(split)]  # deterministic
        prompts = {e.prompt for e in exs}
        assert len(prompts) == len(exs) and not prompts & seen  # disjoint within and across splits
        seen |= prompts
        for e in exs:
            x, op, y = PROMPT.match(e.prompt).groups()
            assert int(e.answer) == OPS[op](int(x), int(y)) >= 0
    ops = {PROMPT.match(e.prompt).group(2) for e in a.examples("test")}
    assert ops == {"+", "-", "*"}
    assert [e.prompt for e in get_task(name, seed=1).examples("test")] != [e.prompt for e in a.examples("test")]


def test_every_split_draws_the_same_mix():
    """Splits by prompt hash: the 255 one-digit pairs are spread like the rest.  Drawing test first
    (the toy suite's rule) gave test 142/400 one-digit pairs and train 60/1500: a held-out set easier
    than what was trained on."""
    task = get_task("arith")
    share = {}
    for split in ("train", "validation", "test"):
        ex = task.examples(split)
        share[split] = sum(e.meta["a"] < 10 and e.meta["b"] < 10 for e in ex) / len(ex)
    assert 0.07 < share["train"] < 0.18 and 0.07 < share["test"] < 0.18, share
    assert abs(share["train"] - share["test"]) < 0.04, share
    # and the same operator mix (subtraction has fewer distinct prompts: a >= b)
    for op in "+-*":
        fr = {s: sum(e.meta["op"] == op for e in task.examples(s)) / len(task.examples(s)) for s in ("train", "test")}
        assert abs(fr["train"] - fr["test"]) < 0.05, (op, fr)


def test_difficulty_knob():
    small = [max(e.meta["a"], e.meta["b"]) for e in get_task("arith").examples("test")]
    hard = [min(e.meta["a"], e.meta["b"]) for e in get_task("arith_hard").examples("test")]
    assert max(small) <= 99 and sum(x < 10 for x in small) > 50  # one-digit pairs are in the test split
    assert min(hard) >= 10 and max(max(e.meta["a"], e.meta["b"]) for e in get_task("arith_hard").examples("test")) >= 100


@pytest.mark.parametrize("completion, ok, parsed", [
    (" 929", True, "929"),
    (" 347 + 582 = 929", True, "929"),
    ("The answer is 929.", True, "929"),
    (" 929.0", True, "929"),
    (" 928", False, "928"),
    (" 929 - 1 = 928", False, "928"),  # the last number counts
    (" 347 + 582 = 929 + 1 = 930", True, "929"),  # after a restatement: the first number after "="
    (" 347 + 582 = 928 + 1 = 929", False, "928"),
    (" 347 + 582 is 929.", True, "929"),
    (" 347+582 = nothing", False, None),
    (" nine hundred", False, None),
    ("", False, None),
])
def test_verifier_reads_the_last_number(completion, ok, parsed):
    from t2dist.tasks.base import Example

    task = get_task("arith")
    v = task.verify(completion, Example("arith", "Q: What is 347 + 582?\nA:", "929", {"a": 347, "op": "+", "b": 582}))
    assert (v.correct, v.parsed, v.reward) == (ok, parsed, 1.0 if ok else -1.0)


def test_commas_and_negatives():
    from t2dist.tasks.base import Example

    task = get_task("arith_hard")
    assert task.verify(" 47,952", Example("arith_hard", "", "47952")).correct
    assert not task.verify(" -47952", Example("arith_hard", "", "47952")).correct


@pytest.mark.parametrize("name", ["arith", "arith_hard"])
def test_oracle_is_perfect(name):
    from t2dist.cli.benchmarks import oracle_eval

    res = oracle_eval(get_task(name), "test")
    assert res["correct"] == res["n"] == len(get_task(name).examples("test"))


def test_chat_template_for_instruct_models_plain_for_base_models():
    from t2dist.models.loading import load_model

    _, tok = load_model("toy")  # no chat template: a base model
    task = get_task("arith")
    ex = task.examples("test")[0]
    assert not getattr(tok, "chat_template", None)
    assert task.prompt_for(ex, tok) == ex.prompt
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    assert task.prompt_for(ex, tok) == f"<user>{ex.prompt}</user><assistant>"
