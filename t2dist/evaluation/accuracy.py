"""Held-out evaluation on a task: greedy accuracy with a Wilson interval, sampled through a rollout engine.

Every caller passes a :class:`t2dist.engines.base.RolloutEngine` with the weights it wants scored
already set (``set_z`` / ``unset_z``): the evaluator actor, ``t2dist eval``, ``train-local``, the
adaptation table.  A plain Hugging Face model is evaluated through
:func:`t2dist.engines.hf.base_model_engine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from t2dist.progress import Progress
from t2dist.tasks import get_task



def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes out of ``n`` (``(0, 1)`` when n is 0)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    task: str
    split: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def as_dict(self, with_records: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("task", "split", "n", "correct", "accuracy", "ci_low", "ci_high")}
        if with_records:
            d["records"] = self.records
        return d


def generate_grouped(gen: Callable[[list, int, tuple], list], prompts: Sequence, settings: Sequence[tuple]) -> list:
    """``gen(prompts, max_new_tokens, stop)`` once per distinct ``(max_new_tokens, stop)`` in ``settings``
    (one per prompt), the outputs back in the prompts' order.  One call when all settings agree."""
    groups: dict[tuple, list[int]] = {}
    for i, (max_new, stop) in enumerate(settings):
        groups.setdefault((max_new, tuple(stop or ())), []).append(i)
    out: list = [None] * len(prompts)
    for (max_new, stop), idx in groups.items():
        for i, c in zip(idx, gen([prompts[i] for i in idx], max_new, stop), strict=True):
            out[i] = c
    return out


def evaluate(
    engine,
    task,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int | None = None,
    records: bool = False,
) -> EvalResult:
    """Greedy-decode ``task``'s ``split`` (first ``limit`` examples) with ``engine`` and score with its verifier.

    ``task``: a :class:`t2dist.tasks.base.Task` or its name; ``max_new_tokens``: None = the task's
    default (``task.max_new_tokens`` in a config)."""
    if isinstance(task, str):
        task = get_task(task)
    examples = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    prompts = [task.prompt_for(e, engine.tokenizer) for e in examples]
    if max_new_tokens:
        settings = [(max_new_tokens, tuple(task.stop or ()))] * len(examples)
    else:
        settings = [task.generation_for(e) for e in examples]

    # Chunks of the engine's batch size (in-process engines batch so anyway; vLLM, which schedules its
    # own batches, gets 128 at a time) so that a long evaluation says how far it is.
    chunk = getattr(engine, "batch_size", None) or 128
    progress = Progress(f"eval {task.name} {split}", total=len(examples))
    done = 0

    def gen(ps, max_new, stop):
        nonlocal done
        out = []
        for i in range(0, len(ps), chunk):
            out += engine.generate(ps[i:i + chunk], temperature=0.0, max_new_tokens=max_new, stop=stop)
            done += len(ps[i:i + chunk])
            progress.update(done)
        return out

    comps = generate_grouped(gen, prompts, settings)
    progress.finish()
    verdicts = task.verify_batch([c.text for c in comps], examples)
    k = sum(1 for v in verdicts if v.correct)
    n = len(examples)
    lo, hi = wilson_interval(k, n)
    recs = []
    if records:
        recs = [
            {
                "prompt": p,
                "completion": c.text,
                "answer": e.answer,
                "parsed": v.parsed,
                "correct": v.correct,
                "trap": bool(e.meta.get("trap", False)),
            }
            for p, c, e, v in zip(prompts, comps, examples, verdicts)
        ]
    return EvalResult(task.name, split, n, k, (k / n) if n else 0.0, lo, hi, recs)
