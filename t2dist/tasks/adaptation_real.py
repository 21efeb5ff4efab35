"""The self-adaptation tasks of a real model: ``mixed_real`` (second pass) and ``dispatch_real`` (first pass).

The toy suite's ``mixed`` and ``dispatch`` (:mod:`t2dist.tasks.adaptation`) hold toy prompts in
the raw ``Q: ...`` text the toy base was pretrained on.  A real instruct model (SmolLM2) has its
own experts and formats, so these two hold the three real-model tasks it has experts for:

=================  ==========  ==================================================  ==============
source task        category    prompt                                              new tokens
=================  ==========  ==================================================  ==============
``arith``          math        ``Q: What is 47 * 6?\\nA:``                           12
``arc_easy``       reasoning   a grade-school science question, options A-D       1 (the letter)
``sentiment``      sentiment   ``Review: The soup was not fresh.\nIs this ...``     8
=================  ==========  ==================================================  ==============

(The word task ``alphabetical`` was the first third kind; its expert gained too little to show
anything, see :mod:`t2dist.tasks.words`.)

``mixed_real``: the three tasks' examples of one split interleaved (test: 3 x 400; ARC-Easy's
1150 cut to 400 by the round-robin).  Each example is written (:meth:`prompt_for`, the model's chat
template when it has one), generated (:meth:`generation_for`: the new-token limit each expert was
trained with, above) and verified exactly as its source task does it, so a single expert scores
on its part of ``mixed_real`` what it scores on its own task.

``dispatch_real``: the same tasks' prompts wrapped in :data:`REAL_TEMPLATE`, a question the model
answers through its chat template after the written start :data:`REAL_ANSWER_PREFIX` ("It is a");
the answer is the category (``science`` and ``review`` read as ``reasoning`` and ``sentiment``).  It trains the classifier expert
(``configs/smollm2-dispatch.yaml``) and measures both first passes.
"""
from __future__ import annotations

from t2dist.tasks.adaptation import DispatchTask, MixedTask
from t2dist.tasks.base import Example, get_task, register_task

REAL_SOURCES: dict[str, str] = {"arith": "math", "arc_easy": "reasoning", "sentiment": "sentiment"}
# New tokens per source: what the experts were trained with (configs/smollm2-{arith,arc_easy,sentiment}.yaml).
REAL_TOKENS: dict[str, int] = {"arith": 12, "arc_easy": 1, "sentiment": 8}
# The question, and the start of the answer written for the model (after the chat template's assistant
# header): SmolLM2 names the kind of 91% of 90 validation prompts (30 per kind) this way.  Asked
# "Is this question about math, science or a review? Answer with one word" without a written
# start, it answered every ARC-Easy question with an option instead (67%); other wordings: 33-74%.
REAL_TEMPLATE = "What kind of text is this: a math problem, a science question, or a review?\n\nText:\n{prompt}"
REAL_ANSWER_PREFIX = "It is a"


# The fourth kind: short Python functions (``pyfunc``), asked and answered as its expert is trained
# (configs/smollm2-pyfunc.yaml: 96 new tokens, the task's stops).  The three-kind tasks above stay as
# they are: the classifier expert of configs/smollm2-dispatch.yaml was trained on dispatch_real's text.
REAL4_SOURCES: dict[str, str] = {**REAL_SOURCES, "pyfunc": "code"}
REAL4_TOKENS: dict[str, int] = {**REAL_TOKENS, "pyfunc": 96}
REAL4_TEMPLATE = ("What kind of text is this: a math problem, a science question, a review, or a programming task?"
                  "\n\nText:\n{prompt}")


@register_task("mixed_real")
class RealMixedTask(MixedTask):
    """arith, ARC-Easy and sentiment examples interleaved, each as its own task writes and checks it."""

    chat = "auto"
    tokens: dict[str, int] = REAL_TOKENS  # new tokens per source task
    max_new_tokens = max(REAL_TOKENS.values())
    sources = tuple(REAL_SOURCES)

    def format_prompt(self, example: Example) -> str:
        return get_task(example.task).format_prompt(example)

    def prompt_for(self, example: Example, tokenizer=None) -> str:
        return get_task(example.task).prompt_for(example, tokenizer)

    def generation_for(self, example: Example) -> tuple[int, tuple[str, ...]]:
        return self.tokens[example.task], tuple(get_task(example.task).stop or ())


@register_task("dispatch_real")
class RealDispatchTask(DispatchTask):
    """Name the kind of a real-model prompt: math, reasoning (science) or sentiment (a review)."""

    chat = "auto"  # the dispatch question is a user turn of the model's chat template
    answer_prefix = REAL_ANSWER_PREFIX
    max_new_tokens = 4  # " science question." - the first word is the label
    sources = REAL_SOURCES

    @staticmethod
    def default_template() -> str:
        return REAL_TEMPLATE

    def corpus_examples(self, n: int, seed: int, trap_fraction: float | None = None) -> list[Example]:
        raise NotImplementedError("dispatch_real has no pretraining corpus (it is for real models)")


@register_task("mixed_real4")
class RealMixedTask4(RealMixedTask):
    """``mixed_real`` and the fourth kind: arith, ARC-Easy, sentiment and pyfunc examples interleaved."""

    tokens = REAL4_TOKENS
    max_new_tokens = max(REAL4_TOKENS.values())
    sources = tuple(REAL4_SOURCES)


@register_task("dispatch_real4")
class RealDispatchTask4(RealDispatchTask):
    """Name the kind of a real-model prompt among four: math, science, a review or a programming task."""

    sources = REAL4_SOURCES

    @staticmethod
    def default_template() -> str:
        return REAL4_TEMPLATE
