"""Few-shot CEM settings side by side: shots, seeding the single experts, per-matrix α.

    python bench/adapt_cem.py --registry registry --experts math,code,reasoning --tasks math_mc,code3

For each setting and task: CEM on k shots of the task's train split, then test accuracy of the
chosen mixture, next to the best single expert's test accuracy (the bar the few-shot row must
reach). Prints a markdown table; `--json F` keeps the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from t2dist.adapt.cem import CEMSettings  # noqa: E402
from t2dist.adapt.strategies import pick_shots  # noqa: E402
from t2dist.orchestration.adapt import setup  # noqa: E402
from t2dist.config import load_config  # noqa: E402
from t2dist.evaluation.accuracy import evaluate, wilson_interval  # noqa: E402
from t2dist.tasks import get_task  # noqa: E402

SETTINGS = {
    "10 shots, seeded": dict(shots=10),
    "10 shots, not seeded": dict(shots=10, seed_experts=False),
    "50 shots, seeded": dict(shots=50),
    "50 shots, not seeded": dict(shots=50, seed_experts=False),
    "50 shots, seeded, per-matrix": dict(shots=50, per_matrix=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--registry", default="registry")
    ap.add_argument("--experts", default="math,code,reasoning")
    ap.add_argument("--tasks", default="math_mc,code3")
    ap.add_argument("--settings", help="semicolon-separated subset of: " + "; ".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(None, [])
    tp = setup(cfg, a.experts.split(","), None, a.registry, "prompt")
    names = [s.strip() for s in a.settings.split(";")] if a.settings else list(SETTINGS)
    rows, out = [], {}
    for tname in a.tasks.split(","):
        task = get_task(tname)
        single = {}
        for cat, e in tp.experts.items():
            tp.use(("expert", cat), e.z)
            single[cat] = evaluate(tp.engine, task, "test").accuracy
        best = max(single.values())
        for name in names:
            s = CEMSettings(**SETTINGS[name], iterations=a.iterations, patience=a.patience)
            shots = pick_shots(task, s.shots)
            t0 = time.perf_counter()
            cem = tp.fewshot(task, shots, s)
            secs = time.perf_counter() - t0
            tp.use(("mix", name, tname), tp.mixed_z(cem.alpha))
            r = evaluate(tp.engine, task, "test")
            lo, hi = wilson_interval(r.correct, r.n)
            alpha = [round(x, 2) for x in cem.alpha.reshape(len(tp.experts), -1).mean(1).tolist()]
            rows.append(f"| {tname} | {name} | {cem.score:.2f} | {r.accuracy:.3f} [{lo:.3f}–{hi:.3f}] | {best:.3f} | "
                        f"{r.accuracy - best:+.3f} | {alpha} | {cem.iterations} | {secs:.0f} |")
            out[f"{tname}/{name}"] = {"shots_score": cem.score, "test": r.accuracy, "best_single": best,
                                      "single": single, "alpha": cem.alpha.tolist(), "iterations": cem.iterations}
            print(rows[-1], flush=True)
    print("\n| task | setting | shots acc | test acc [95% CI] | best single | Δ | α (mean per expert) | iterations | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
