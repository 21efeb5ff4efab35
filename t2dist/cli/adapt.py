"""``t2dist adapt`` and ``t2dist adapt-table``: two-pass self-adaptation from the command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from t2dist.atomic import atomic_write_text

COMMANDS = {
    "adapt": "two-pass inference with registry experts: dispatch by prompt or classifier expert, or few-shot CEM mixing",
    "adapt-table": "write the markdown table Base / single experts / Prompt / Cls-expert / Few-shot (the toy suite, or a real model's)",
}
REGISTRY_HELP = "registry URL or directory (default $T2DIST_REGISTRY or ./registry); experts may also be directories"


def _common(p) -> None:
    p.add_argument("--registry", metavar="URL", help=REGISTRY_HELP)
    p.add_argument("--experts", help="comma-separated expert refs (NAME, NAME@V, NAME:ALIAS, or dirs); adapt.experts")
    p.add_argument("--cls-expert", help="classifier expert ref for strategy cls (adapt.cls_expert)")
    p.add_argument("--model", help="base model (model.path); default: the config's")
    p.add_argument("--config", help="YAML run config (defaults when omitted)")


def add_parsers(sub) -> None:
    p = sub.add_parser("adapt", help=COMMANDS["adapt"], description=COMMANDS["adapt"])
    _common(p)
    p.add_argument("--strategy", choices=["prompt", "cls", "fewshot"], help="adapt.strategy (default prompt)")
    p.add_argument("--task", help="batch mode: evaluate on this task's split (fewshot: the task the shots come from)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="only the first N examples of the split")
    p.add_argument("--publish", action="store_true", help="fewshot: publish the mixture to --registry")
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("prompt", nargs="?", help="one prompt to answer (omit for batch mode over --task)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. adapt.cem.shots=50")

    p = sub.add_parser("adapt-table", help=COMMANDS["adapt-table"], description=COMMANDS["adapt-table"])
    _common(p)
    p.add_argument("--columns", default="math_mc,code3,mixed", help="tasks (columns) of the table")
    p.add_argument("--limit", type=int, help="only the first N test examples of each column")
    p.add_argument("--strategies", default="prompt,cls,fewshot",
                   help="two-pass rows after Base and the single experts (fewshot's CEM is the slow one)")
    p.add_argument("--out", required=True, help="markdown file to write (a .json with the raw numbers beside it)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")


def _cfg(args):
    from t2dist.config import load_config

    over = list(args.overrides or [])
    if args.model:
        over.append(f"model.path={args.model}")
    if getattr(args, "strategy", None):
        over.append(f"adapt.strategy={args.strategy}")
    cfg = load_config(args.config, over)
    refs = [r for r in (args.experts.split(",") if args.experts else cfg.adapt.experts) if r.strip()]
    cls_ref = args.cls_expert or cfg.adapt.cls_expert
    return cfg, refs, cls_ref


def cmd_adapt(args) -> int:
    from t2dist.adapt.strategies import AdaptError
    from t2dist.orchestration.adapt import publish_mixture, run_fewshot, setup
    from t2dist.tasks import get_task
    from t2dist.tasks.base import apply_chat_template

    cfg, refs, cls_ref = _cfg(args)
    strategy = cfg.adapt.strategy
    # a positional "prompt" that looks like key=value is an override given without a prompt
    if args.prompt and "=" in args.prompt.split("\n")[0] and args.prompt.split("=")[0].count(" ") == 0 \
            and "." in args.prompt.split("=")[0]:
        args.overrides = [args.prompt, *args.overrides]
        args.prompt = None
        cfg, refs, cls_ref = _cfg(args)
        strategy = cfg.adapt.strategy
    task = get_task(args.task) if args.task else None
    if args.prompt is None and task is None:
        raise AdaptError("give a PROMPT or --task for batch mode")
    if args.publish and strategy != "fewshot":
        raise AdaptError("--publish is for strategy fewshot (a mixture expert)")
    tp = setup(cfg, refs, cls_ref, args.registry, strategy, task=task)
    out: dict = {"strategy": strategy, "experts": refs}
    if args.prompt is not None:
        prompt = args.prompt.encode().decode("unicode_escape") if "\\n" in args.prompt else args.prompt
        max_new = task.max_new_tokens if task else 16
        # the second pass sees the prompt as the task (or the dispatch question) meets the chat template
        answer_prompt = apply_chat_template(prompt, tp.tokenizer, task.chat if task else tp.chat)
        if strategy == "fewshot":
            cem = run_fewshot(tp, cfg, task, log=lambda m: print(m, file=sys.stderr))
            label = "mixture"
            text = tp.answer_with("mixture", tp.mixed_z(cem.alpha), [answer_prompt], max_new)[0]
            out["alpha"] = cem.alpha.tolist()
        else:
            label = tp.classify([prompt], strategy)[0]
            text = tp.answer([answer_prompt], [label], max_new)[0]
        print(f"[{label}] {text}")
        out.update(prompt=prompt, label=label, completion=text)
    else:
        exs = task.examples(args.split)[: args.limit]
        settings = None
        shots = ()
        if strategy == "fewshot":
            from t2dist.adapt.loading import cem_settings

            settings = cem_settings(cfg)
            if cfg.adapt.actors > 0:
                cem = run_fewshot(tp, cfg, task, settings, log=lambda m: print(m, file=sys.stderr))
                prompts = [task.prompt_for(e, tp.tokenizer) for e in exs]
                texts = tp.answer_with("mixture", tp.mixed_z(cem.alpha), prompts,
                                       settings=[task.generation_for(e) for e in exs])
                ok = [v.correct for v in task.verify_batch(texts, exs)]
                from t2dist.adapt.strategies import AdaptRun

                run = AdaptRun("fewshot", ["mixture"] * len(exs), texts, ok, cem=cem)
            else:
                from t2dist.adapt.strategies import pick_shots

                shots = pick_shots(task, settings.shots, cfg.adapt.cem.shots_split, settings.seed)
                run = tp.run(task, exs, strategy, shots=shots, settings=settings,
                             log=lambda m: print(m, file=sys.stderr))
        else:
            run = tp.run(task, exs, strategy)
        lo, hi = run.interval
        line = f"{task.name}/{args.split} {strategy}: accuracy {run.accuracy:.3f} [95% CI {lo:.3f}-{hi:.3f}] (n={run.n})"
        if run.dispatch_accuracy is not None:
            line += f"; dispatch accuracy {run.dispatch_accuracy:.3f}; first pass {run.first_pass_s:.2f}s = " \
                    f"{run.first_pass_s / max(run.second_pass_s, 1e-9):.0%} of second pass"
        print(line)
        out.update(task=task.name, split=args.split, **run.as_dict())
        if strategy == "fewshot":
            print(f"alpha {[round(x, 3) for x in run.cem.alpha.flatten().tolist()][:12]} after "
                  f"{run.cem.iterations} iterations (shots accuracy {run.cem.score:.3f})")
            if args.publish:
                ref = publish_mixture(tp, cfg, refs, run.cem, task, args.registry or _default_registry())
                print(f"published {ref}")
                out["published"] = ref
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2, default=str))
    return 0


def _default_registry() -> str:
    from t2dist.registry import default_registry_url

    return default_registry_url()


def cmd_adapt_table(args) -> int:
    from t2dist.orchestration.adapt import adaptation_table

    cfg, refs, cls_ref = _cfg(args)
    cols = [c for c in args.columns.split(",") if c]
    strategies = [s for s in args.strategies.split(",") if s]
    md, raw = adaptation_table(cfg, refs, cls_ref, args.registry, cols, limit=args.limit, strategies=strategies)
    out = Path(args.out)
    atomic_write_text(out, md)
    atomic_write_text(out.with_suffix(".json"), json.dumps(raw, indent=2, default=str))
    print(md)
    print(f"wrote {out}")
    return 0


HANDLERS = {"adapt": cmd_adapt, "adapt-table": cmd_adapt_table}  # AdaptError/DispatchError are UserErrors: main prints them
