"""The ``t2dist`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from t2dist.cli.common import config_from_args as _config
from t2dist.cli.common import policy_overrides_from_card  # noqa: F401  (also t2dist.cli.main's public name)
from t2dist.cli.common import write_json as _write_json
from t2dist.errors import USER_ERRORS, Interrupted

COMMANDS = {
    "train": "distributed SVF-RL: Ray rollout actors, a DeepSpeed learner, evaluator, checkpoints, TensorBoard",
    "toy-base": "build and pretrain the toy base model into a Hugging Face directory",
    "train-local": "single-process SVF-RL of one expert (the reference the distributed trainer matches)",
    "eval": "greedy accuracy (with a 95%% interval) of the base model or an expert on a task split",
    "expert": "inspect an expert directory (`expert show PATH`)",
    "tasks": "list the registered tasks with their skills and split sizes",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. rl.lr=0.005")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2dist",
        description="Transformer² self-adaptive LLMs: SVF experts trained with distributed RL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    _add_config_args(p)

    p = sub.add_parser("toy-base", help=COMMANDS["toy-base"], description=COMMANDS["toy-base"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the build's default)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train-local", help=COMMANDS["train-local"], description=COMMANDS["train-local"])
    p.add_argument("--model", help="model directory (model.path); 'toy' = the embedded toy base")
    p.add_argument("--task", help="task name (task.name)")
    p.add_argument("--steps", type=int, help="RL steps (rl.steps)")
    p.add_argument("--out", required=True, help="where to write the expert directory")
    p.add_argument("--json", help="write base/final test accuracy and timings to this JSON file")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after test evaluation")
    _add_config_args(p)

    p = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"])
    p.add_argument("--model", help="model directory (model.path)")
    p.add_argument("--expert", help="expert directory or NAME[@VERSION|:ALIAS] in --registry; omitted: the base model")
    p.add_argument("--registry", metavar="URL", help="registry holding --expert (default $T2DIST_REGISTRY or ./registry)")
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("--oracle", action="store_true",
                   help="score the task's reference answers through its verifier instead (no model loaded)")
    p.add_argument("--records", action="store_true",
                   help="with --json: also write each example's prompt, completion and verdict")
    _add_config_args(p)

    p = sub.add_parser("expert", help=COMMANDS["expert"], description=COMMANDS["expert"])
    esub = p.add_subparsers(dest="expert_command", metavar="ACTION", required=True)
    show = esub.add_parser("show", help="print the card and z statistics of an expert")
    show.add_argument("path")

    sub.add_parser("tasks", help=COMMANDS["tasks"], description=COMMANDS["tasks"])
    from t2dist.cli import registry as cli_registry

    cli_registry.add_parsers(sub)
    from t2dist.cli import adapt as cli_adapt

    cli_adapt.add_parsers(sub)
    from t2dist.cli import benchmarks as cli_benchmarks

    cli_benchmarks.add_parsers(sub)
    from t2dist.cli import serve as cli_serve

    cli_serve.add_parsers(sub)
    return parser


def cmd_train(args) -> int:
    from t2dist.config import load_config
    from t2dist.orchestration.train import train

    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            from t2dist.config import ConfigError

            raise ConfigError(f"--resume {args.resume}: {saved} does not exist (not a t2dist run directory)")
        from t2dist.config import apply_overrides, config_from_dict

        data = apply_overrides(json.loads(saved.read_text()), list(args.overrides))
        cfg = config_from_dict(data, str(saved))
    else:
        cfg = load_config(args.config, list(args.overrides))
    train(cfg, resume=args.resume, progress=not args.quiet)
    return 0


def cmd_toy_base(args) -> int:
    from t2dist.toy.build import build_toy_base

    kwargs = {"seed": args.seed}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    out = build_toy_base(args.out, **kwargs)
    print(f"toy base written to {out}")
    return 0


def _eval_json(res) -> dict:
    return res.as_dict()


def _interval(res) -> str:
    return f"[95% CI {res.ci_low:.3f}-{res.ci_high:.3f}]"


def cmd_train_local(args) -> int:
    import time

    from t2dist.engines.hf import HFEngine
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.experts.expert import make_card, save_expert
    from t2dist.policy.load import load_policy
    from t2dist.rl.local import train_local
    from t2dist.tasks import get_task

    cfg = _config(args, {"model.path": args.model, "task.name": args.task, "rl.steps": args.steps})
    task = get_task(cfg.task.name)
    if task.unseen:
        print(f"warning: task {task.name!r} is an unseen variant meant for adaptation, not training", file=sys.stderr)
    out = Path(args.out)
    policy, tokenizer = load_policy(cfg, verbose=True)
    # two in-process HF engines over the one policy: sampling in rollout batches, evaluation in eval batches
    sampler = HFEngine(cfg, policy=policy, tokenizer=tokenizer)
    scorer = HFEngine(cfg, policy=policy, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    t0 = time.perf_counter()
    result: dict = {"task": task.name, "model": cfg.model.path, "steps": cfg.rl.steps}
    if not args.no_eval:
        base = evaluate(scorer, task, split=cfg.eval.split, limit=cfg.eval.limit)
        result["base"] = _eval_json(base)
        print(f"base {cfg.eval.split} accuracy: {base.accuracy:.3f} {_interval(base)}")
    run = train_local(cfg, sampler, task)
    result["train_seconds"] = run.seconds
    if not args.no_eval:
        scorer.set_z(run.z, version="final")
        final = evaluate(scorer, task, split=cfg.eval.split, limit=cfg.eval.limit)
        scorer.unset_z()
        result["final"] = _eval_json(final)
        result["gain"] = final.accuracy - base.accuracy
        print(f"expert {cfg.eval.split} accuracy: {final.accuracy:.3f} {_interval(final)} "
              f"(gain {result['gain']:+.3f}) after {run.seconds:.1f}s of training")
    result["total_seconds"] = time.perf_counter() - t0
    metrics = {k: result[k] for k in ("gain", "train_seconds") if k in result}
    if "final" in result:
        metrics.update({f"{cfg.eval.split}_accuracy": result["final"]["accuracy"],
                        f"base_{cfg.eval.split}_accuracy": result["base"]["accuracy"]})
    from t2dist.config import dump_config

    card = make_card(policy, name=out.name, task=task.name, metrics=metrics, config=dump_config(cfg),
                     base_model=cfg.model.path, history=run.history[-1:] and run.history)
    save_expert(out, run.z, card)
    result["expert"] = str(out)
    print(f"expert written to {out}")
    if args.json:
        _write_json(args.json, result)
    return 0


def cmd_eval(args) -> int:
    from t2dist.engines import make_engine
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.experts.expert import check_compatible
    from t2dist.tasks import get_task

    if args.oracle:
        from t2dist.cli.benchmarks import oracle_eval

        res = oracle_eval(get_task(args.task), args.split, args.limit)
        print(f"{res['task']}/{args.split} oracle: accuracy {res['accuracy']:.3f} "
              f"[95% CI {res['ci_low']:.3f}-{res['ci_high']:.3f}] (n={res['n']})")
        if args.json:
            _write_json(args.json, res)
        return 0 if res["correct"] == res["n"] else 1
    extra = {"model.path": args.model}
    expert = None
    if args.expert:
        from t2dist.registry import read_expert_ref

        expert = read_expert_ref(args.expert, args.registry)  # fail on a bad expert before loading the model
        extra.update(policy_overrides_from_card(expert.card, args.overrides))
    cfg = _config(args, extra)
    task = get_task(args.task)
    engine = make_engine(cfg, cfg.eval.engine or cfg.rollout.engine, batch_size=cfg.eval.batch_size)
    policy = engine.policy
    if expert is not None:
        check_compatible(expert, policy, source=f"expert {args.expert}")
        engine.set_z(expert.z, version=args.expert)
    try:
        res = evaluate(engine, task, split=args.split, limit=args.limit, max_new_tokens=cfg.task.max_new_tokens,
                       records=args.records)
    finally:
        engine.close()
    out = {"task": task.name, "split": args.split, "model": cfg.model.path, "expert": args.expert,
           "expert_version": expert.card.get("version") if expert else None,
           **res.as_dict(with_records=args.records)}
    print(f"{task.name}/{args.split}: accuracy {res.accuracy:.3f} {_interval(res)} (n={res.n})")
    if args.json:
        _write_json(args.json, out)
    return 0


def cmd_expert(args) -> int:
    from t2dist.experts.expert import read_expert, z_statistics
    from t2dist.policy.registry import policy_class

    expert = read_expert(args.path)
    card = dict(expert.card)
    card.pop("history", None)
    config = card.pop("config", {})
    print(json.dumps(card, indent=2))
    print(f"config: {len(json.dumps(config))} bytes (see card.json)")
    stats = z_statistics(expert.z, expert.parametrization)
    print(policy_class(expert.kind).stats_title)
    for k, v in stats.items():
        print(f"  {k:>16}: {v:.4f}" if isinstance(v, float) else f"  {k:>16}: {v}")
    return 0


def cmd_tasks(args) -> int:
    from t2dist.tasks import TASKS, get_task

    print(f"{'task':<16}{'skill':<12}{'unseen':<8}{'train':>7}{'val':>6}{'test':>6}")
    for name in sorted(TASKS):
        t = get_task(name)
        try:
            sizes = [len(t.examples(s)) for s in ("train", "validation", "test")]
        except (OSError, ValueError) as exc:  # a benchmark whose data is not installed here
            print(f"{name:<16}{t.skill:<12}{str(t.unseen):<8}  no data: {str(exc).splitlines()[0]}")
            continue
        print(f"{name:<16}{t.skill:<12}{str(t.unseen):<8}{sizes[0]:>7}{sizes[1]:>6}{sizes[2]:>6}")
    return 0


from t2dist.cli.registry import COMMANDS as _REGISTRY_COMMANDS  # noqa: E402
from t2dist.cli.registry import HANDLERS as _REGISTRY_HANDLERS  # noqa: E402

COMMANDS.update(_REGISTRY_COMMANDS)
from t2dist.cli.adapt import COMMANDS as _ADAPT_COMMANDS  # noqa: E402
from t2dist.cli.adapt import HANDLERS as _ADAPT_HANDLERS  # noqa: E402

COMMANDS.update(_ADAPT_COMMANDS)
from t2dist.cli.benchmarks import COMMANDS as _BENCH_COMMANDS  # noqa: E402
from t2dist.cli.benchmarks import HANDLERS as _BENCH_HANDLERS  # noqa: E402

COMMANDS.update(_BENCH_COMMANDS)
from t2dist.cli.serve import COMMANDS as _SERVE_COMMANDS  # noqa: E402
from t2dist.cli.serve import HANDLERS as _SERVE_HANDLERS  # noqa: E402

COMMANDS.update(_SERVE_COMMANDS)
HANDLERS = {**_REGISTRY_HANDLERS, "train": cmd_train, "toy-base": cmd_toy_base, "train-local": cmd_train_local, "eval": cmd_eval,
            "expert": cmd_expert, "tasks": cmd_tasks, **_ADAPT_HANDLERS, **_BENCH_HANDLERS, **_SERVE_HANDLERS}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return HANDLERS[args.command](args)
    except USER_ERRORS as exc:
        print(f"t2dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a run's Interrupted says what it kept), no traceback
        print(str(exc) if isinstance(exc, Interrupted) else f"[t2dist] {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
