"""Real-model runs through ``t2dist train`` (Ray actors, DeepSpeed learner), one row per (config, seed).

    python bench/real_models.py --config configs/smollm2-arith.yaml --seeds 0 1 2
    python bench/real_models.py --config configs/smollm2-arith.yaml --seeds 0 --adopt /work/runs/s0 --wall 1234
    python bench/real_models.py --render                       # the markdown table from the JSON only
    python bench/real_models.py --test-curve --config configs/smollm2-arith.yaml --seeds 0 2   # checkpoints on test
    python bench/real_models.py --trl --config configs/smollm2-arith-lora.yaml --seeds 1   # TRL's row

Each run is the exact command recorded in its row (a subprocess, one after another, so every run
has the machine to itself): ``t2dist train --config C rl.seed=S run_dir=... registry.url=...``.
Its ``summary.json`` gives base and final test accuracy with 95% Wilson intervals (``eval.limit``
held-out problems; the final z is the best on validation); the row's ``wall_seconds`` is the
command's whole wall time (Ray start, model load, SVD, both test evaluations included), the
number the issue's "≤ 30 min per run" goal is about.

``--trl`` runs TRL's ``GRPOTrainer`` + peft LoRA instead (``bench/lora_vs_svf.py``'s TRL job, one
process on all cores) with the config's model, task, prompts (the same chat-templated text),
reward, temperature, steps, prompts × samples, lr and ``lora:`` settings; its final adapter (TRL has
no best-on-validation pick) is scored on the same test problems.  Every row keeps its validation
curve (``train.eval_every`` steps, ``train.eval_limit`` problems, with the training seconds up to
each check), so :func:`seconds_to` can say how long t2dist took to reach TRL's final accuracy.

Rows go to ``bench/results/<date>-real-models.json`` (``--json``; rows of the same config, seed and
method are replaced, others kept); the markdown table it prints is the one in the ``.md`` beside it.  ``--adopt DIR`` records a
run that was started by hand with the same command (``--wall`` seconds as measured by ``time``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t2dist.hardware import machine_line  # noqa: E402

FIELDS = ("model", "task", "method", "seed", "base_accuracy", "base_ci_low", "base_ci_high", "final_accuracy",
          "final_ci_low", "final_ci_high", "n_test", "wall_seconds", "steps", "samples_per_step", "config",
          "command", "run_dir", "base_fingerprint")


def default_json() -> Path:
    return ROOT / "bench" / "results" / f"{_dt.date.today().isoformat()}-real-models.json"


def train_command(config: str, seed: int, out: Path, overrides: list[str]) -> list[str]:
    return ["t2dist", "train", "--config", config, f"rl.seed={seed}", "ray.address=local",
            f"run_dir={out / f'seed{seed}'}", f"registry.url={out / 'registry'}", *overrides]


def lr_note(schedule: str | None) -> str:
    """The method's suffix for a decaying lr (rows of constant-lr runs keep their names)."""
    return "" if schedule in (None, "constant") else f", lr {schedule}"


def row_of(run_dir: Path, config: str, seed: int, command: list[str], wall: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    card = run_dir / "expert" / "card.json"
    fingerprint = json.loads(card.read_text()).get("base_fingerprint") if card.is_file() else None
    return {
        "model": cfg["model"]["path"], "task": cfg["task"]["name"],
        "method": f"t2dist train, {(cfg.get('policy') or {}).get('kind', 'svf')}" + lr_note(cfg["rl"].get("lr_schedule")),
        "device": machine_line(str(cfg["model"]["device"]).split(":")[0]),  # the CPU by name, or the card
        "seed": seed,
        "base_accuracy": summary["base_accuracy"], "base_ci_low": summary["base_ci"][0],
        "base_ci_high": summary["base_ci"][1],
        "final_accuracy": summary["final_accuracy"], "final_ci_low": summary["final_ci"][0],
        "final_ci_high": summary["final_ci"][1],
        "n_test": summary["n_test"], "wall_seconds": round(wall, 1), "steps": summary["steps"],
        "samples_per_step": cfg["rl"]["prompts_per_step"] * cfg["rl"]["samples_per_prompt"],
        "best_step": summary.get("best_step"), "last_accuracy": summary.get("last_accuracy"),
        "config": config, "command": shlex.join(command), "run_dir": str(run_dir), "base_fingerprint": fingerprint,
        "train_seconds": summary.get("train_seconds"), "curve": t2dist_curve(run_dir),
        "step_breakdown": step_breakdown(run_dir), "integrity": summary.get("integrity"),
        "actor_restarts": summary.get("actor_restarts"),
    }


BREAKDOWN = ("generate_s", "scoring_s", "learner_s", "sync_s", "step_s")


def step_breakdown(run_dir: Path) -> dict:
    """Mean seconds per step of generation, scoring (the verifier: the sandbox for code), learner and z sync,
    and each part's share of the step, over the run's steps after the first (which warms caches up)."""
    from t2dist.orchestration.checkpoint import latest_checkpoint

    hist = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["history"][1:]
    if not hist:
        return {}
    mean = {k: sum(h.get(k, 0.0) for h in hist) / len(hist) for k in BREAKDOWN}
    return {**{k: round(v, 2) for k, v in mean.items()},
            **{f"{k[:-2]}_share": round(v / mean["step_s"], 3) for k, v in mean.items() if k != "step_s"},
            "steps_counted": len(hist)}


def t2dist_curve(run_dir: Path) -> list[dict]:
    """The run's validation checks, each with the summed step seconds up to it (evaluations overlap the steps)."""
    from t2dist.orchestration.checkpoint import latest_checkpoint

    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    elapsed = step_seconds(state["history"])
    return [{"step": e["step"], "train_seconds": round(elapsed[e["step"]], 1), "val_accuracy": e["accuracy"]}
            for e in state["evals"]]


def step_seconds(history: list[dict]) -> dict[int, float]:
    """``{step: summed step seconds up to and including it}`` from a run state's per-step history."""
    elapsed, t = {}, 0.0
    for h in history:
        t += h["step_s"]
        elapsed[h["step"]] = t
    return elapsed


def test_curve(run_dir: Path) -> list[dict]:
    """Every kept checkpoint's z scored on the run's test problems (greedy, ``eval.limit`` of them), with
    the summed step seconds up to it: the test-set counterpart of the validation curve, in one process.
    The run must keep its checkpoints (``train.checkpoint_every`` = ``train.eval_every``,
    ``train.keep_checkpoints`` >= the number of checks)."""
    from t2dist.orchestration.checkpoint import latest_checkpoint, load_checkpoint
    from t2dist.config import load_config
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.engines.hf import HFEngine
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task

    cfg = load_config(run_dir / "config.json")
    policy, tok = load_policy(cfg)
    engine = HFEngine(cfg, policy=policy, tokenizer=tok, batch_size=cfg.eval.batch_size)
    task = get_task(cfg.task.name)
    history = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())["history"]
    elapsed = step_seconds(history)
    out = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        z, state = load_checkpoint(ckpt)
        engine.set_z(z, version=state["step"])
        res = evaluate(engine, task, split=cfg.eval.split, limit=cfg.eval.limit, max_new_tokens=cfg.task.max_new_tokens)
        engine.unset_z()
        out.append({"step": state["step"], "train_seconds": round(elapsed[state["step"]], 1),
                    "test_accuracy": res.accuracy})
        print(f"  {run_dir.name} step {state['step']}: test {100 * res.accuracy:.1f}%", flush=True)
    return out


def seconds_to(curve: list[dict], accuracy: float) -> float | None:
    """Training seconds until the first validation check at or above ``accuracy`` (None: never)."""
    return next((c["train_seconds"] for c in curve if c["val_accuracy"] >= accuracy - 1e-9), None)


def trl_job(config: str, seed: int, overrides: list[str]) -> dict:
    """bench/lora_vs_svf.py's TRL job with ``config``'s (and ``overrides``') model, task, budget and LoRA settings."""
    from t2dist.config import load_config

    cfg = load_config(config, [f"rl.seed={seed}", *overrides])
    lora, rl = cfg.lora, cfg.rl
    return {"runner": "trl", "kind": "lora", "model": cfg.model.path, "task": cfg.task.name, "seed": seed,
            "steps": rl.steps, "prompts": rl.prompts_per_step, "samples": rl.samples_per_prompt, "lr": rl.lr,
            "lr_schedule": rl.lr_schedule,
            "temperature": rl.temperature, "max_new_tokens": cfg.task.max_new_tokens, "lora_r": lora.r,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "lora_targets": lora.targets,
            "threads": os.cpu_count(), "eval_tasks": [cfg.task.name], "eval_limit": cfg.eval.limit,
            "val_limit": cfg.train.eval_limit, "val_every": cfg.train.eval_every, "eval_base": True}


def trl_row(config: str, seed: int, overrides: list[str], command: list[str]) -> dict:
    """Run TRL GRPO + peft LoRA (a subprocess) and make its row."""
    sys.path.insert(0, str(ROOT / "bench"))
    from lora_vs_svf import run_job

    job = trl_job(config, seed, overrides)
    t0 = time.perf_counter()
    res = run_job(job, lambda m: print(m, flush=True))
    if res is None:
        raise SystemExit(f"the TRL run of {config} seed {seed} failed (see above)")
    wall = time.perf_counter() - t0
    base, final = res["base_eval"][job["task"]], res["eval"][job["task"]]
    return {"model": job["model"], "task": job["task"], "method": f"TRL {res['trl']} GRPO, lora" + lr_note(job["lr_schedule"]),
            "device": machine_line(), "seed": seed, "base_accuracy": base["accuracy"],
            "base_ci_low": base["ci_low"], "base_ci_high": base["ci_high"], "final_accuracy": final["accuracy"],
            "final_ci_low": final["ci_low"], "final_ci_high": final["ci_high"], "n_test": final["n"], "wall_seconds": round(wall, 1), "steps": job["steps"],
            "samples_per_step": job["prompts"] * job["samples"], "train_seconds": round(res["train_seconds"], 1),
            "trainable": res["trainable"], "curve": res["curve"], "config": config, "command": shlex.join(command),
            "run_dir": None, "base_fingerprint": None}


def save_rows(path: Path, new: list[dict]) -> list[dict]:
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    key = lambda r: (r["config"], r["method"], r["seed"])  # noqa: E731
    replaced = {key(r) for r in new}
    rows = [r for r in rows if key(r) not in replaced] + new
    rows.sort(key=lambda r: (r["model"], r["task"], r["method"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| model | task | method | seed | base (95% CI) | final (95% CI) | gain | n | steps | wall |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gain = 100 * (r["final_accuracy"] - r["base_accuracy"])
        wall = "—" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.1f} min"  # None: see the row's note
        lines.append(
            f"| {r['model']} | {r['task']} | {r['method']} | {r['seed']} | {100 * r['base_accuracy']:.1f}% "
            f"[{100 * r['base_ci_low']:.1f}–{100 * r['base_ci_high']:.1f}] | {100 * r['final_accuracy']:.1f}% "
            f"[{100 * r['final_ci_low']:.1f}–{100 * r['final_ci_high']:.1f}] | {gain:+.1f} | {r['n_test']} | "
            f"{r['steps']} | {wall} |")
    return "\n".join(lines)


def render_vs_trl(rows: list[dict]) -> str:
    """For each TRL row: how long each t2dist run of the same model and task took to reach TRL's final
    validation accuracy, against TRL's training seconds (validation checks only; evaluation time excluded)."""
    lines = []
    for trl in (r for r in rows if r["method"].startswith("TRL") and r.get("curve")):
        target, trl_s = trl["curve"][-1]["val_accuracy"], trl["train_seconds"]
        lines.append(f"TRL ({trl['model']}, {trl['task']}, seed {trl['seed']}): final validation accuracy "
                     f"{100 * target:.1f}% after {trl_s / 60:.1f} min of training.")
        for r in rows:
            if r["method"].startswith("t2dist") and (r["model"], r["task"]) == (trl["model"], trl["task"]) and r.get("curve"):
                t = seconds_to(r["curve"], target)
                checks = ", ".join(f"{c['step']}: {100 * c['val_accuracy']:.1f}%" for c in r["curve"])
                reached = (f"reached it after {t / 60:.1f} min ({t / trl_s:.2f}x TRL's)" if t is not None
                           else "never reached it")
                lines.append(f"- {r['method']}, seed {r['seed']}: {reached}; validation by step: {checks}")
        tested = [r for r in rows if r.get("test_curve") and (r["model"], r["task"]) == (trl["model"], trl["task"])]
        if tested:
            target = trl["final_accuracy"]
            lines.append(f"TRL's final test accuracy {100 * target:.1f}% (n={trl['n_test']}), against t2dist's checkpoints on "
                         "the same test problems:")
        for r in tested:
            hit = next((c["train_seconds"] for c in r["test_curve"] if c["test_accuracy"] >= target - 1e-9), None)
            checks = ", ".join(f"{c['step']}: {100 * c['test_accuracy']:.1f}%" for c in r["test_curve"])
            reached = (f"reached it after {hit / 60:.1f} min ({hit / trl_s:.2f}x TRL's)" if hit is not None
                       else "never reached it")
            lines.append(f"- {r['method']}, seed {r['seed']}: {reached}; test by step: {checks}")
    return "\n".join(lines)


def schedule_of(method: str) -> str:
    """The lr schedule a row's method names (", lr linear"; none named: constant)."""
    return method.rsplit(", lr ", 1)[1] if ", lr " in method else "constant"


def render_trl_grid(rows: list[dict]) -> str:
    """Issue 14's "t2dist's time to TRL's final accuracy <= 0.5x TRL's", every t2dist seed against every TRL
    seed of the same model, task and lr schedule: a t2dist run's first checkpoint on test at or above that TRL
    run's final test accuracy, as a share of that TRL run's training seconds ("never": no checkpoint got there)."""
    out = []
    for trl_method in sorted({r["method"] for r in rows if r["method"].startswith("TRL")}):
        trls = sorted((r for r in rows if r["method"] == trl_method), key=lambda r: r["seed"])
        key = (trls[0]["model"], trls[0]["task"], schedule_of(trl_method))
        ours = sorted((r for r in rows if r["method"].startswith("t2dist") and r.get("test_curve")
                       and (r["model"], r["task"], schedule_of(r["method"])) == key), key=lambda r: r["seed"])
        if not ours:
            continue
        head = " | ".join(f"TRL seed {t['seed']}: {100 * t['final_accuracy']:.1f}% in {t['train_seconds'] / 60:.1f} min"
                          for t in trls)
        out += [f"{ours[0]['method']} against {trl_method} ({key[0]}, {key[1]}): time to TRL's final test accuracy",
                f"| t2dist seed | {head} |", "| ---: |" + " ---: |" * len(trls)]
        met = 0
        for r in ours:
            cells = []
            for t in trls:
                hit = next((c["train_seconds"] for c in r["test_curve"]
                            if c["test_accuracy"] >= t["final_accuracy"] - 1e-9), None)
                met += hit is not None and hit <= 0.5 * t["train_seconds"]
                cells.append("never" if hit is None else f"{hit / t['train_seconds']:.2f}x")
            out.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
        out.append(f"{met} of {len(ours) * len(trls)} pairs at or under 0.5x.")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--out", default=str(Path(os.environ.get("T2DIST_HOME", "runs")) / "real-models"),
                    help="run directories go under OUT/<config name>/seedS")
    ap.add_argument("--json", type=Path, default=default_json())
    ap.add_argument("--adopt", type=Path, help="record this finished run directory instead of running")
    ap.add_argument("--wall", type=float, help="with --adopt: the run's measured wall seconds")
    ap.add_argument("--command", help="with --adopt: the exact command that ran (default: the one this script runs)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown table from the JSON")
    ap.add_argument("--trl", action="store_true", help="run TRL GRPOTrainer + peft LoRA with the config's settings")
    ap.add_argument("--test-curve", action="store_true",
                    help="score the kept checkpoints of the config's recorded seeds on the test problems")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = ap.parse_args(argv)

    new = []
    if args.test_curve:
        rows = json.loads(args.json.read_text())["rows"]
        for r in rows:
            if r["config"] == args.config and r["seed"] in args.seeds and r.get("run_dir"):
                r["test_curve"] = test_curve(Path(r["run_dir"]))
                new.append(r)
    elif not args.render:
        if not args.config:
            ap.error("--config is required unless --render")
        out = Path(args.out).resolve() / Path(args.config).stem
        for seed in args.seeds:
            if args.trl:
                cmd = ["python", "bench/real_models.py", "--trl", "--config", args.config, *args.overrides,
                       "--seeds", str(seed)]  # overrides before --seeds, which would take them as seeds
                new.append(trl_row(args.config, seed, args.overrides, cmd))
                save_rows(args.json, new[-1:])
                continue
            cmd = train_command(args.config, seed, out, args.overrides)
            if args.adopt:
                if args.wall is None:
                    ap.error("--adopt needs --wall (the run's measured wall seconds)")
                ran = shlex.split(args.command) if args.command else cmd
                new.append(row_of(args.adopt, args.config, seed, ran, args.wall))
                continue
            print("$", shlex.join(cmd), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            new.append(row_of(out / f"seed{seed}", args.config, seed, cmd, time.perf_counter() - t0))
            save_rows(args.json, new[-1:])
    rows = save_rows(args.json, new) if new else json.loads(args.json.read_text())["rows"]
    print(render(rows))  # the table of bench/results/<date>-real-models.md
    for extra in (render_vs_trl(rows), render_trl_grid(rows)):
        if extra:
            print("\n" + extra)


if __name__ == "__main__":
    main()
