"""``t2dist serve``: the OpenAI-compatible, self-adaptive endpoint (Ray Serve; docs/serving.md).

With no ``--config`` it serves SmolLM2-135M-Instruct (``model.path=smollm2``, converted from its wheel
on first use) with the experts shipped in ``t2dist/assets/experts-smollm2/`` (a registry directory),
the ``dispatch_real`` first pass and ``serve.strategy=cls`` with the shipped classifier (dispatch
accuracy on mixed_real: 100% against the base's 92.5%, n=600, bench/results/2026-11-30-real-two-pass.md);
``--model``, ``--registry`` and ``key=value`` overrides change that.  The API key comes from ``--api-key`` or ``$T2DIST_API_KEY`` and is never written anywhere.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

COMMANDS = {"serve": "an OpenAI-compatible endpoint on Ray Serve: the base, each expert by name, and model=auto "
                     "(the two-pass picks the expert per request)"}
SHIPPED_EXPERTS = Path(__file__).resolve().parent.parent / "assets" / "experts-smollm2"
API_KEY_ENV = "T2DIST_API_KEY"


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help=COMMANDS["serve"], description=COMMANDS["serve"])
    p.add_argument("--config", help="YAML run config (without one: SmolLM2 and the shipped experts)")
    p.add_argument("--model", help="base model (model.path), e.g. smollm2, toy, a HF directory")
    p.add_argument("--registry", metavar="URL", help="the experts' registry (registry.url)")
    p.add_argument("--host", help="address to bind (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (serve.port, default 8000)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes (default ${API_KEY_ENV})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. serve.replicas=2")


def serve_config(args):
    """The run config: the file (or the embedded defaults), then the flags, then ``key=value`` overrides."""
    from t2dist.config import load_config

    over = list(args.overrides or [])
    given = {o.split("=", 1)[0] for o in over}
    flags = {"model.path": args.model, "registry.url": args.registry, "serve.host": args.host,
             "serve.port": args.port}
    over = [f"{k}={v}" for k, v in flags.items() if v is not None] + over
    given |= {k for k, v in flags.items() if v is not None}
    if args.config is None:  # the embedded default: SmolLM2 with the shipped experts
        embedded = {"model.path": "smollm2"}
        model = args.model or _override(over, "model.path") or "smollm2"
        if model == "smollm2":
            embedded["adapt.dispatch_task"] = "dispatch_real"
            if SHIPPED_EXPERTS.is_dir():
                embedded["registry.url"] = str(SHIPPED_EXPERTS)
                if (SHIPPED_EXPERTS / "experts" / "dispatch").is_dir():  # the shipped classifier: 100% vs 92.5%
                    embedded["serve.strategy"] = "cls"
        over = [f"{k}={v}" for k, v in embedded.items() if k not in given] + over
    return absolute_paths(load_config(args.config, over))


def _override(over: list[str], key: str) -> str | None:
    vals = [o.split("=", 1)[1] for o in over if o.split("=", 1)[0] == key]
    return vals[-1] if vals else None


def absolute_paths(cfg):
    """Relative local paths (registry, factor and model caches) made absolute here: the replicas run in
    other processes (other directories, other machines' copies); ``output_root`` / ``$T2DIST_HOME`` first."""
    root = Path(cfg.output_root or os.environ.get("T2DIST_HOME") or os.getcwd()).expanduser()
    cfg = cfg.model_copy(deep=True)

    def fix(v):
        return str(root / Path(v).expanduser()) if v and "://" not in v and not Path(v).expanduser().is_absolute() \
            else v

    cfg.registry.url = fix(cfg.registry.url)
    cfg.svf.cache_dir = fix(cfg.svf.cache_dir)
    cfg.model.cache_dir = fix(cfg.model.cache_dir)
    return cfg


def say(msg: str) -> None:
    print(f"[t2dist serve] {msg}", flush=True)


def describe(plan) -> str:
    experts = ", ".join(f"{n} ({c or 'classifier'})" for n, c in plan.categories.items()) or "none"
    live = " + any published later" if plan.dynamic and plan.registry_url else ""
    return (f"base {plan.model_name} (max {plan.max_model_len} tokens); experts: {experts}{live}; auto: "
            f"strategy {plan.serve.strategy}, routes {plan.routes() or '{}'} (other -> base)")


def cmd_serve(args) -> int:
    from t2dist.serve.engine_choice import choose_engine
    from t2dist.serve.plan import make_plan

    cfg = serve_config(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    say(f"model {cfg.model.path}, registry {cfg.registry.url or '(none)'}: reading experts and the base model")
    plan = make_plan(cfg, say)
    say(describe(plan))
    engine, why = choose_engine(plan, say)
    say(f"engine {engine}: {why}")
    from t2dist.serve import ray_app

    try:
        clean = ray_app.run(plan, engine, api_key, say)
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        print("[t2dist serve] stopped", file=sys.stderr)
        return 0
    if not clean:  # ray.shutdown() hung: exit without Python's exit hooks, whose own ray.shutdown() would hang too
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
    return 0


HANDLERS = {"serve": cmd_serve}
