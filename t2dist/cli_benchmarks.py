"""CLI pieces for real models and benchmarks: ``t2dist models`` and ``t2dist eval --oracle``."""
from __future__ import annotations

import argparse

COMMANDS = {"models": "list the models model.path can name here without downloading (toy, smollm2, HF cache)"}


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help=COMMANDS["models"], description=COMMANDS["models"])
    p.add_argument("--cache-dir", help="model cache (model.cache_dir; default $T2DIST_CACHE/models)")


def cmd_models(args: argparse.Namespace) -> int:
    from t2dist.models import available_models

    rows = available_models(args.cache_dir)
    width = max([len("model.path")] + [len(r["name"]) for r in rows]) + 2
    print(f"{'model.path':<{width}}{'status':<28}where")
    for r in rows:
        print(f"{r['name']:<{width}}{r['status']:<28}{r['where']}")
    return 0


def oracle_eval(task, split: str, limit: int | None = None) -> dict:
    """The task's reference completions scored through its own verifier (no model): should be 100%."""
    from t2dist.evaluation import wilson_interval
    from t2dist.tasks.base import check_split

    check_split(split)
    if not hasattr(task, "reference_completion"):
        from t2dist.config import ConfigError

        raise ConfigError(f"task {task.name!r} has no reference completions (--oracle needs reference_completion)")
    examples = task.examples(split)[:limit] if limit else task.examples(split)
    verdicts = task.verify_batch([task.reference_completion(e) for e in examples], examples)
    k, n = sum(v.correct for v in verdicts), len(examples)
    lo, hi = wilson_interval(k, n)
    failed = [{"id": e.meta.get("id"), "parsed": v.parsed, "detail": v.detail}
              for e, v in zip(examples, verdicts) if not v.correct]
    return {"task": task.name, "split": split, "oracle": True, "n": n, "correct": k,
            "accuracy": k / n if n else 0.0, "ci_low": lo, "ci_high": hi, "failed": failed[:20]}


HANDLERS = {"models": cmd_models}
