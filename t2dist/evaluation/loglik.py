"""Log-likelihood accuracy of multiple-choice tasks: what a model *knows*, apart from whether it says the letter.

Ranked classification as the ``rc`` format of ai2-olmo-eval (OLMES) scores ARC: the context is
``"Question: <question>\\nAnswer:"`` (raw text, never the chat template), each option is the
continuation ``" <option text>"``, and an option's score is the sum of its tokens'
log-probabilities given the context (context and continuation tokenized separately, the
context with the tokenizer's special tokens, e.g. Gemma's ``<bos>``).  The prediction is the
best-scoring option (ties: the first).  One forward pass per option gives both accuracies:

* ``acc`` — the raw sum (olmo-eval's ``acc``, oe-eval's ``acc_raw``);
* ``acc_per_char`` — the sum divided by the continuation's length in characters (oe-eval's
  ``acc_per_char``, olmo-eval's ``len_norm``: the primary metric OLMES reports for ARC-Easy).

Zero-shot: OLMES puts 5 solved questions before the context; this scores the bare question,
like olmo-eval's ``arc_easy`` (``rc_0shot``) task.

Measured (SmolLM2-135M-Instruct, ARC-Easy test, the first 200 of our hash split, 2 shared CPU
cores, 12 min wall under load): ``acc`` 49.5% [42.6-56.4], ``acc_per_char`` 45.0% [38.3-51.9],
against 26.5% [20.9-33.0] for the option letter through the chat template (same 200; issue 14):
the model knows far more than its letters show, which is the room RL on letters has.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from t2dist.errors import UserError
from t2dist.evaluation.accuracy import wilson_interval
from t2dist.rl.logprobs import completion_logprobs

LETTERS = string.ascii_uppercase


class LoglikError(UserError, ValueError):
    """The task's examples carry no option texts to rank."""


@dataclass(frozen=True)
class RCRequest:
    """One ranked-classification problem: a context, the option continuations, the gold option's index."""

    context: str
    continuations: tuple[str, ...]
    gold: int


def rc_request(task, example) -> RCRequest:
    """The ``rc`` request of a multiple-choice example (``meta["question"]`` and ``meta["options"]``,
    the gold letter as ``answer``, as the ARC tasks write them)."""
    question, options = example.meta.get("question"), example.meta.get("options")
    if not question or not options:
        raise LoglikError(f"task {task.name!r} has no question and option texts in its examples; log-likelihood "
                          "accuracy needs a multiple-choice task such as arc_easy or arc_challenge")
    if example.answer not in LETTERS[: len(options)]:
        raise LoglikError(f"task {task.name!r}: gold {example.answer!r} is not an option letter")
    return RCRequest(f"Question: {question}\nAnswer:", tuple(f" {o}" for o in options), LETTERS.index(example.answer))


def score_options(model, tokenizer, requests: Sequence[RCRequest], batch_size: int = 16) -> list[list[float]]:
    """Sum of log p(continuation tokens | context) for every option of every request.

    The (context, option) pairs of all requests are batched together (right-padded; only the
    logits predicting continuation tokens go through ``log_softmax``).
    """
    pairs, owners = [], []
    for r, req in enumerate(requests):
        ctx = tokenizer(req.context)["input_ids"]
        for cont in req.continuations:
            ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
            if not ids:
                raise LoglikError(f"option {cont!r} tokenizes to nothing")
            pairs.append((ctx, ids))
            owners.append(r)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))  # less padding
    by_index: dict[int, float] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            logp, _ = completion_logprobs(model, [pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk], pad, device)
            for i, s in zip(chunk, logp.sum(-1).tolist()):
                by_index[i] = s
    sums = [by_index[i] for i in range(len(pairs))]
    out: list[list[float]] = [[] for _ in requests]
    for r, s in zip(owners, sums):
        out[r].append(s)
    return out


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


@dataclass
class LoglikResult:
    task: str
    split: str
    n: int
    correct: int  # acc (raw sum)
    correct_per_char: int  # acc_per_char
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self, with_records: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.task, "split": self.split, "n": self.n, "format": "rc, 0-shot"}
        for key, k in (("acc", self.correct), ("acc_per_char", self.correct_per_char)):
            lo, hi = wilson_interval(k, self.n)
            d[key] = {"correct": k, "accuracy": k / self.n if self.n else 0.0, "ci_low": lo, "ci_high": hi}
        if with_records:
            d["records"] = self.records
        return d


def loglik_eval(model, tokenizer, task, split: str = "test", limit: int | None = None,
                batch_size: int = 16) -> LoglikResult:
    """Log-likelihood accuracy of ``task``'s ``split`` (the first ``limit`` examples), raw and per character."""
    examples = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    requests = [rc_request(task, e) for e in examples]  # fails on a task without options, before any forward
    scores = score_options(model, tokenizer, requests, batch_size)
    k_raw = k_char = 0
    records = []
    for req, sc in zip(requests, scores):
        per_char = [s / len(c) for s, c in zip(sc, req.continuations)]
        raw_pick, char_pick = _argmax(sc), _argmax(per_char)
        k_raw += raw_pick == req.gold
        k_char += char_pick == req.gold
        records.append({"gold": req.gold, "pick": raw_pick, "pick_per_char": char_pick, "logprobs": sc})
    return LoglikResult(task.name, split, len(examples), k_raw, k_char, records)
