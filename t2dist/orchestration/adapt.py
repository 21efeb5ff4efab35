"""Self-adaptation driver: two-pass inference, few-shot CEM farmed out to rollout actors, the table.

Top-level (like ``t2dist/orchestration/train.py``): it may import Ray; the core in ``t2dist/adapt/``
never does.  ``adapt.actors = 0`` (the default) scores CEM candidates in process; N > 0
starts N :class:`actors.adapt.AdaptWorker` Ray actors (a local cluster unless one is
running) and splits each population over them.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from actors.adapt import AdaptWorker
from t2dist.adapt.cem import CEMResult, CEMSettings
from t2dist.adapt.loading import build_two_pass, cem_settings, read_cls_expert, read_experts
from t2dist.adapt.strategies import AdaptError, AdaptRun, TwoPass, pick_shots
from t2dist.config import Config, dump_config
from t2dist.evaluation.accuracy import evaluate, wilson_interval
from t2dist.experts.expert import make_card
from t2dist.registry import Registry
from t2dist.tasks import get_task
from t2dist.tasks.base import Example, Task


class ParallelEvaluator:
    """Score CEM candidates on N rollout actors, each with its own merged W'."""

    def __init__(self, cfg: Config, zs: Sequence[dict], task: Task, shots: Sequence[Example], actors: int):
        import ray  # lazy: `t2dist adapt` with adapt.actors=0 (the default) runs in process, without Ray

        if not ray.is_initialized():
            need = actors * max(cfg.rollout.cpus_per_actor, 0.01)
            try:
                ray.init(address="auto" if cfg.ray.address == "auto" else cfg.ray.address, log_to_driver=False)
            except (ConnectionError, ValueError):
                ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
                         log_to_driver=False)
            self._owns_ray = True
        else:
            self._owns_ray = False
        remote = ray.remote(num_cpus=cfg.rollout.cpus_per_actor, num_gpus=cfg.rollout.gpus_per_actor)(AdaptWorker)
        data = dump_config(cfg)
        self.actors = [remote.remote(data, i) for i in range(actors)]
        zs_cpu = [{k: v.detach().cpu() for k, v in z.items()} for z in zs]
        ray.get([a.set_experts.remote(zs_cpu) for a in self.actors])
        self.task_name = task.name
        self.shots_ref = ray.put(list(shots))
        self._ray = ray

    def __call__(self, cands: Sequence[torch.Tensor]) -> list[float]:
        n = len(self.actors)
        chunks = [list(range(i, len(cands), n)) for i in range(n)]
        futures = [a.score_mixtures.remote([cands[i] for i in idx], self.task_name, self.shots_ref)
                   for a, idx in zip(self.actors, chunks) if idx]
        out = [0.0] * len(cands)
        for idx, scores in zip([c for c in chunks if c], self._ray.get(futures)):
            for i, s in zip(idx, scores):
                out[i] = s
        return out

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        if self._owns_ray:
            self._ray.shutdown()


def run_fewshot(tp: TwoPass, cfg: Config, task: Task, settings: CEMSettings | None = None,
                actors: int | None = None, log=None) -> CEMResult:
    """CEM over α on ``shots`` examples of ``task`` (in process, or on ``actors`` Ray actors)."""
    s = settings or cem_settings(cfg)
    shots = pick_shots(task, s.shots, cfg.adapt.cem.shots_split, seed=s.seed)
    n = cfg.adapt.actors if actors is None else actors
    if n <= 0:
        return tp.fewshot(task, shots, s, log=log)
    ev = ParallelEvaluator(cfg, [e.z for e in tp.experts.values()], task, shots, n)
    try:
        return tp.fewshot(task, shots, s, evaluator=ev, log=log)
    finally:
        ev.close()


def mixture_card(tp: TwoPass, cfg: Config, refs: Sequence[str], cem: CEMResult, task: Task) -> dict:
    return make_card(tp.policy, name=f"mix-{task.name}", task=task.name, metrics={"shots_accuracy": cem.score},
                     config=dump_config(cfg), base_model=cfg.model.path,
                     mixture={"experts": list(refs), "categories": list(tp.experts),
                              "alpha": cem.alpha.tolist(), "per_matrix": cem.alpha.dim() == 2,
                              "shots": cfg.adapt.cem.shots, "score": cem.score, "trace": cem.trace})


def publish_mixture(tp: TwoPass, cfg: Config, refs: Sequence[str], cem: CEMResult, task: Task,
                    registry: str) -> str:
    card = mixture_card(tp, cfg, refs, cem, task)
    return Registry(registry, create=True).publish(tp.mixed_z(cem.alpha), card)


def setup(cfg: Config, refs: Sequence[str], cls_ref: str | None, registry: str | None, strategy: str,
          task: Task | None = None, verbose: bool = False) -> TwoPass:
    """Read and check everything that needs no model, then load the model."""
    experts = read_experts(refs, registry)
    cls_expert = read_cls_expert(cls_ref, registry) if strategy == "cls" else None
    if strategy == "cls" and cls_expert is None:
        raise AdaptError("strategy cls needs a classifier expert (--cls-expert / adapt.cls_expert)")
    if strategy == "fewshot":
        if task is None:
            raise AdaptError("strategy fewshot needs a task (--task) to draw its shots from")
        n = len(task.examples(cfg.adapt.cem.shots_split))
        if n < cfg.adapt.cem.shots:
            raise AdaptError(f"task {task.name!r} has {n} {cfg.adapt.cem.shots_split} examples, fewer than "
                             f"adapt.cem.shots={cfg.adapt.cem.shots}")
    return build_two_pass(cfg, experts, cls_expert, verbose=verbose)


# ----------------------------------------------------------------------------------- the table
def _cell(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.3f} [{lo:.3f}–{hi:.3f}]"


def by_task(correct: Sequence[bool], examples: Sequence[Example]) -> dict[str, list[int]]:
    """``{source task: [right, n]}`` of a column whose examples come from several tasks (``mixed_real``)."""
    out: dict[str, list[int]] = {}
    for ok, e in zip(correct, examples, strict=True):
        k = out.setdefault(e.task, [0, 0])
        k[0] += bool(ok)
        k[1] += 1
    return out


def _fewshot_cell(tp: TwoPass, cfg: Config, task: Task, col: str, exs: Sequence[Example]) -> dict:
    t0 = time.perf_counter()
    cem = run_fewshot(tp, cfg, task, log=None)
    t1 = time.perf_counter()
    a = tp.answer_with(("mixture", col), tp.mixed_z(cem.alpha), [task.prompt_for(e, tp.tokenizer) for e in exs],
                       settings=[task.generation_for(e) for e in exs])
    t2 = time.perf_counter()
    ok = [v.correct for v in task.verify_batch(a, list(exs))]
    return {"correct_list": ok, "first_pass_s": t1 - t0, "second_pass_s": t2 - t1,
            "alpha": [round(x, 3) for x in cem.alpha.flatten().tolist()][:12], "cem_iterations": cem.iterations,
            "shots_score": cem.score}


def adaptation_table(cfg: Config, refs: Sequence[str], cls_ref: str | None, registry: str | None,
                     columns: Sequence[str] = ("math_mc", "code3", "mixed"), split: str = "test",
                     limit: int | None = None, log=print,
                     strategies: Sequence[str] = ("prompt", "cls", "fewshot")) -> tuple[str, dict]:
    """Rows Base, each single expert, then Prompt, Cls-expert, Few-shot (those in ``strategies``);
    columns ``columns``.  A column mixing several tasks also records each task's share (``by_task``)."""
    unknown = [s for s in strategies if s not in ("prompt", "cls", "fewshot")]
    if unknown:
        raise AdaptError(f"unknown strategies {unknown}; known: prompt, cls, fewshot")
    tp = setup(cfg, refs, cls_ref, registry, "cls" if cls_ref and "cls" in strategies else "prompt", verbose=True)
    tasks = {c: get_task(c) for c in columns}
    exs = {c: tasks[c].examples(split)[:limit] for c in columns}
    res: dict[str, dict[str, dict]] = {}

    def put(row, col, correct: Sequence[bool], **extra):
        n, k = len(correct), sum(map(bool, correct))
        cell = {"correct": k, "n": n, "accuracy": k / n, **extra}
        if len({e.task for e in exs[col]}) > 1:
            cell["by_task"] = by_task(correct, exs[col])
        res.setdefault(row, {})[col] = cell
        log(f"{row} {col}: {k / n:.3f}" + (f" dispatch {extra['dispatch_accuracy']:.3f}"
                                           if extra.get("dispatch_accuracy") is not None else ""))

    for col, task in tasks.items():
        for row, key, z in [("Base", None, None), *((f"{c} expert", ("expert", c), e.z) for c, e in tp.experts.items())]:
            tp.use(key, z)
            r = evaluate(tp.engine, task, split, limit=limit, records=True)
            put(row, col, [rec["correct"] for rec in r.records])
        for row, strat in (("Prompt", "prompt"), ("Cls-expert", "cls"), ("Few-shot", "fewshot")):
            if (strat == "cls" and tp.cls_expert is None) or strat not in strategies:
                continue
            if strat == "fewshot":
                cell = _fewshot_cell(tp, cfg, task, col, exs[col])
                put(row, col, cell.pop("correct_list"), **cell)
                continue
            run = tp.run(task, exs[col], strat)
            put(row, col, run.correct, dispatch_accuracy=run.dispatch_accuracy, first_pass_s=run.first_pass_s,
                second_pass_s=run.second_pass_s, merges=run.merges,
                labels={c: run.labels.count(c) for c in sorted(set(run.labels))})
    # dispatch accuracy on the dispatch task's test set (the toy's is 4-way, incl. "other")
    disp = get_task(cfg.adapt.dispatch_task, template=tp.template)
    dex = [e for e in disp.examples(split)][:limit]
    extra = {}
    for row, strat in (("Prompt", "prompt"), ("Cls-expert", "cls")):
        if (strat == "cls" and tp.cls_expert is None) or strat not in strategies:
            continue
        labels = tp.classify([e.meta["source_prompt"] for e in dex], strat)
        extra[row] = sum(lab == e.answer for lab, e in zip(labels, dex)) / len(dex)
    md = format_table(res, columns, extra, len(dex), cfg)
    return md, {"results": res, "dispatch_4way": extra, "n_dispatch": len(dex)}


def format_table(res: dict, columns: Sequence[str], dispatch4: dict, n4: int, cfg: Config) -> str:
    c = cfg.adapt.cem
    toy = cfg.adapt.dispatch_task == "dispatch"
    where = "the synthetic suite" if toy else f"`{cfg.model.path}`"
    cem = (f" Few-shot: CEM, population {c.population}, elites {c.elite_frac}, ≤{c.iterations} iterations "
           f"(patience {c.patience}), {c.shots} shots from {c.shots_split}, init std {c.init_std}, "
           f"{'per-matrix' if c.per_matrix else 'per-expert'} α, single experts "
           f"{'seeded' if c.seed_experts else 'not seeded'}.") if "Few-shot" in res else ""
    lines = [f"# Self-adaptation on {where} ({_dt.date.today().isoformat()})", "",
             f"{'Toy base' if toy else 'Base'} `{cfg.model.path}`; accuracy on the test split (greedy) with 95% "
             f"Wilson intervals.{cem}", "",
             "n per column: " + ", ".join(f"{k} {next(iter(res.values()))[k]['n']}" for k in columns) + ".", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row, cols in res.items():
        lines.append(f"| {row} | " + " | ".join(_cell(cols[k]["correct"], cols[k]["n"]) if k in cols else "–"
                                                 for k in columns) + " |")
    lines += ["", "First pass (dispatch, or the CEM search for Few-shot):", "",
              "| method | " + " | ".join(f"{k} dispatch acc" for k in columns)
              + (" | 4-way dispatch acc (incl. other, n=" if toy else f" | {cfg.adapt.dispatch_task} acc (n=")
              + f"{n4}) | " + " | ".join(f"{k} first/second pass time" for k in columns) + " |",
              "|---|" + "---|" * (2 * len(columns) + 1)]
    for row in ("Prompt", "Cls-expert", "Few-shot"):
        if row not in res:
            continue
        cols = res[row]
        acc = [f"{cols[k]['dispatch_accuracy']:.3f}" if cols.get(k, {}).get("dispatch_accuracy") is not None else "–"
               for k in columns]
        share = [f"{cols[k]['first_pass_s'] / cols[k]['second_pass_s']:.0%}" if k in cols else "–" for k in columns]
        d4 = f"{dispatch4[row]:.3f}" if row in dispatch4 else "–"
        lines.append(f"| {row} | " + " | ".join(acc) + f" | {d4} | " + " | ".join(share) + " |")
    fs = res.get("Few-shot", {})
    if fs:
        lines += ["", "Few-shot α (experts in the order given): " + "; ".join(
            f"{k}: {v['alpha']} ({v['cem_iterations']} iterations, shots accuracy {v['shots_score']:.2f})"
            for k, v in fs.items())]
    return "\n".join(lines + by_task_lines(res, columns)) + "\n"


def by_task_lines(res: dict, columns: Sequence[str]) -> list[str]:
    """One table per column that mixes tasks: each row's accuracy on each source task's part."""
    lines: list[str] = []
    for col in columns:
        srcs = next((cells[col]["by_task"] for cells in res.values() if "by_task" in cells.get(col, {})), None)
        if not srcs:
            continue
        lines += ["", f"{col} by source task:", "", "| method | " + " | ".join(srcs) + " |", "|---|" + "---|" * len(srcs)]
        for row, cells in res.items():
            bt = cells.get(col, {}).get("by_task", {})
            lines.append(f"| {row} | " + " | ".join(_cell(*bt[t]) if t in bt else "–" for t in srcs) + " |")
    return lines
