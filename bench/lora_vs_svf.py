"""SVF vs LoRA inside t2dist, and t2dist vs TRL GRPO + peft LoRA, side by side in one run.

    python bench/lora_vs_svf.py                 # the full grid (math, code, reasoning × 3 seeds; TRL on math)
    python bench/lora_vs_svf.py --quick         # a smoke run: a few steps, small eval limits, one seed
    python bench/lora_vs_svf.py --tasks math,reasoning --seeds 0,1,2 --code-seeds 0 --trl-seeds 0

Every training job runs in its own subprocess (``--job``), one after another, so that
peak resident memory (``ru_maxrss``) and threads are per job and nothing is shared.

* t2dist jobs use :func:`t2dist.rl.local.train_local` — the single-process oracle the
  distributed trainer matches exactly (tests/test_train.py, tests/test_lora.py) — because
  TRL here is also one process; the policy is ``policy.kind=svf`` (z on the MLP matrices)
  or ``policy.kind=lora`` (peft LoRA, r/alpha/dropout/targets from ``lora:``), everything
  else identical: prompts per step, samples per prompt, steps, temperature, max new
  tokens, verifier reward ±1, group-mean baseline, token-mean loss, Adam, clip 1, beta 0.
* The TRL job runs ``trl.GRPOTrainer`` with a ``peft.LoraConfig`` on the same toy base and
  task with those settings mapped onto GRPOConfig (``scale_rewards="none"`` = group-mean
  baseline, ``loss_type="dapo"`` = token mean, the job's ``rl.lr_schedule`` (constant unless set),
  AdamW without weight decay, ``beta=0``, the newline stop as an extra eos like t2dist's stop string), on CPU,
  ``report_to="none"``.
* Accuracy: greedy, on the test split (``--eval-limit``), with 95% Wilson intervals, for the
  training task and the other tasks (collateral damage).  "Seconds to final" is the
  training time (evaluation time excluded) until the first validation check
  (``--val-every`` steps, ``--val-limit`` examples) within one point of the last one.
* Weight-sync traffic: bytes per update of z vs the LoRA tensors vs a broadcast of the
  full target matrices, measured on the toy and computed for Llama-3-8B / 70B shapes.

Writes ``bench/results/<date>-lora-vs-svf.md`` (``--out``) and prints the same markdown.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ALL_TASKS = ("math", "code", "reasoning")


# -- helpers used by the jobs -----------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def wilson(k: int, n: int) -> tuple[float, float]:
    from t2dist.evaluation.accuracy import wilson_interval

    return wilson_interval(k, n)


def eval_tasks(engine, tasks, limit, split="test", max_new_tokens: dict | None = None) -> dict:
    """Greedy accuracy on each task with ``engine``; ``max_new_tokens`` maps a task to its budget (else the task's own)."""
    from t2dist.evaluation.accuracy import evaluate

    out = {}
    for t in tasks:
        t0 = time.perf_counter()
        r = evaluate(engine, t, split=split, limit=limit, max_new_tokens=(max_new_tokens or {}).get(t))
        out[t] = {**r.as_dict(), "seconds": time.perf_counter() - t0}
    return out


def seconds_to_final(curve: list[dict]) -> float:
    """Training seconds until the first validation check within 1 point of the last one."""
    if not curve:
        return float("nan")
    last = curve[-1]["val_accuracy"]
    return next(c["train_seconds"] for c in curve if c["val_accuracy"] >= last - 0.01)


def cfg_for(job: dict):
    from t2dist.config import load_config

    kind = job["kind"]
    over = [f"policy.kind={kind}", f"task.name={job['task']}", f"rl.steps={job['steps']}", f"rl.seed={job['seed']}",
            f"rl.prompts_per_step={job['prompts']}", f"rl.samples_per_prompt={job['samples']}",
            f"rl.lr={job['lr']}", f"rl.lr_schedule={job.get('lr_schedule', 'constant')}",
            f"lora.r={job['lora_r']}", f"lora.alpha={job['lora_alpha']}",
            f"lora.dropout={job['lora_dropout']}", f"lora.targets={job['lora_targets']}", "svf.cache_dir=null",
            f"model.path={job.get('model', 'toy')}"]
    return load_config(DEMO, over)


def job_base(job: dict) -> dict:
    from t2dist.engines.in_process import base_model_engine
    from t2dist.models.loading import load_model

    from t2dist.svf.factors import fingerprint

    model, tok = load_model(job.get("model", "toy"))
    return {"eval": eval_tasks(base_model_engine(model, tok), job["eval_tasks"], job["eval_limit"]),
            "base_info": f"weights fingerprint {fingerprint(model)[:16]}"}


def job_t2dist(job: dict) -> dict:
    from t2dist.engines.hf import HFEngine
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.rl.local import train_local
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task

    cfg = cfg_for(job)
    t_load = time.perf_counter()
    policy, tok = load_policy(cfg)
    scorer = HFEngine(cfg, policy=policy, tokenizer=tok, batch_size=64)  # evaluate()'s batch before engines
    load_s = time.perf_counter() - t_load
    task = get_task(job["task"])
    curve: list[dict] = []
    history_time = {"train": 0.0}

    def callback(step, z, rec):
        history_time["train"] += rec["rollout_s"] + rec["learn_s"]
        if step % job["val_every"] == 0 or step == job["steps"]:
            scorer.set_z(z, version=("val", step))
            r = evaluate(scorer, task, split="validation", limit=job["val_limit"])
            curve.append({"step": step, "train_seconds": history_time["train"], "val_accuracy": r.accuracy})

    run = train_local(cfg, HFEngine(cfg, policy=policy, tokenizer=tok, batch_size=128), task, progress=False,  # as measured
                      callback=callback)
    rss = peak_rss_mb()
    scorer.set_z(run.z, version="final")
    evals = eval_tasks(scorer, job["eval_tasks"], job["eval_limit"])
    return {"train_seconds": history_time["train"], "load_seconds": load_s, "s_per_step": history_time["train"] / job["steps"],
            "peak_rss_mb": rss, "trainable": policy.num_z, "curve": curve, "seconds_to_final": seconds_to_final(curve),
            "eval": evals, "reward_first": run.history[0]["reward"], "reward_last": run.history[-1]["reward"]}


def job_trl(job: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from t2dist.engines.generation import _stop_token_ids
    from t2dist.engines.in_process import base_model_engine
    from t2dist.evaluation.accuracy import evaluate
    from t2dist.models.loading import load_model
    from t2dist.tasks import get_task

    task = get_task(job["task"])
    max_new = job.get("max_new_tokens") or task.max_new_tokens
    budgets = {job["task"]: max_new}
    t_load = time.perf_counter()
    model, tok = load_model(job.get("model", "toy"))
    for p in model.parameters():
        p.requires_grad_(False)
    base_eval = None
    if job.get("eval_base"):  # the base on the same test problems, before any training (not timed)
        t_base = time.perf_counter()
        base_eval = eval_tasks(base_model_engine(model, tok), job["eval_tasks"], job["eval_limit"], max_new_tokens=budgets)
        t_load += time.perf_counter() - t_base
    # the task's stop string ends a completion, as in t2dist's generate (TRL masks after any eos id)
    eos = [tok.eos_token_id] + sorted(_stop_token_ids(tok, task.stop))
    model.generation_config.eos_token_id = eos
    examples = task.examples("train")
    # the exact prompt text t2dist samples from (through the chat template for an instruct model); a
    # plain-string prompt is not templated again by TRL
    data = Dataset.from_dict({"prompt": [task.prompt_for(e, tok) for e in examples], "idx": list(range(len(examples)))})

    def reward(completions, idx, **_):
        texts = [c.split(task.stop[0])[0] if task.stop else c for c in completions]
        return [v.reward for v in task.verify_batch(texts, [examples[i] for i in idx])]

    reward.__name__ = f"{task.name}_verifier"
    val_task = task
    curve: list[dict] = []
    clock = {"eval": 0.0, "start": None}

    class ValCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            step = state.global_step
            if step % job["val_every"] == 0 or step == job["steps"]:
                t0 = time.perf_counter()
                was_training = model.training
                model.eval()
                r = evaluate(base_model_engine(model, tok), val_task, split="validation", limit=job["val_limit"],
                             max_new_tokens=max_new)
                if was_training:
                    model.train()
                train_s = t0 - clock["start"] - clock["eval"]
                clock["eval"] += time.perf_counter() - t0
                curve.append({"step": step, "train_seconds": train_s, "val_accuracy": r.accuracy})

    P, N = job["prompts"], job["samples"]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=P * N, num_generations=N, gradient_accumulation_steps=1,
            steps_per_generation=1, max_completion_length=max_new, temperature=job.get("temperature", 1.0), top_p=1.0,
            top_k=0,
            learning_rate=job["lr"], lr_scheduler_type=job.get("lr_schedule", "constant"), optim="adamw_torch", weight_decay=0.0,
            max_grad_norm=1.0, beta=0.0, scale_rewards="none", loss_type="dapo", num_iterations=1,
            max_steps=job["steps"], use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
            seed=job["seed"], data_seed=job["seed"], bf16=False, fp16=False, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        peft_cfg = LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=job["lora_dropout"],
                              target_modules=[s.strip() for s in job["lora_targets"].split(",")], task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tok, peft_config=peft_cfg, callbacks=[ValCallback()])
        load_s = time.perf_counter() - t_load
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        torch.set_num_threads(job["threads"])  # the Trainer may have changed it
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0 - clock["eval"]
        rss = peak_rss_mb()
        final = trainer.model.eval()
        evals = eval_tasks(base_model_engine(final, tok), job["eval_tasks"], job["eval_limit"], max_new_tokens=budgets)
        rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    return {"train_seconds": wall, "load_seconds": load_s, "s_per_step": wall / job["steps"], "peak_rss_mb": rss,
            "trainable": trainable, "curve": curve, "seconds_to_final": seconds_to_final(curve), "eval": evals,
            "reward_last": rewards[-1] if rewards else None, "trl": trl.__version__, "base_eval": base_eval}


JOBS = {"base": job_base, "t2dist": job_t2dist, "trl": job_trl}


def run_job_here(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job.get("seed", 0))
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    out = JOBS[job["runner"]](job)
    out.update(job=job, wall_seconds=time.perf_counter() - t0, load_start=load0, load_end=os.getloadavg()[0])
    return out


def run_job(job: dict, log) -> dict:
    """One job in a fresh interpreter (own peak RSS, own threads)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job), "--job-out", out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                          env={**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        log(f"[bench] job failed (left out of the report): {job}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return None
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    log(f"  {job['runner']:<6} {job.get('kind', ''):<4} {job.get('task', ''):<9} seed {job.get('seed', '-')}: "
        f"{time.perf_counter() - t0:6.1f}s  " + "  ".join(f"{t} {v['accuracy']:.3f}" for t, v in res["eval"].items()))
    return res


# -- weight-sync traffic ----------------------------------------------------------------------
LLAMA = {  # hidden, intermediate, layers, kv width (8 KV heads × 128)
    "Llama-3-8B": {"h": 4096, "m": 14336, "L": 32, "kv": 1024, "params": 8.03e9},
    "Llama-3-70B": {"h": 8192, "m": 28672, "L": 80, "kv": 1024, "params": 70.6e9},
}


def traffic_rows(r: int) -> list[dict]:
    """Values and bytes one update sends to every rollout actor."""
    from t2dist.config import load_config
    from t2dist.policy.load import load_policy

    rows = []
    svf, _ = load_policy(load_config(DEMO, ["svf.cache_dir=null"]))
    lora, _ = load_policy(load_config(DEMO, ["policy.kind=lora", f"lora.r={r}"]))
    svf_w = sum(svf.model.get_submodule(t).weight.numel() for t in svf.targets)
    lora_w = sum(lora.model.get_submodule(t).base_layer.weight.numel() for t in lora.targets)
    z_bytes = sum(v.numel() * 4 for v in svf.init_z().values())  # what RolloutWorker.set_expert reports (fp32)
    ab_bytes = sum(v.numel() * 4 for v in lora.init_z().values())
    full_model = sum(p.numel() for n, p in svf.model.named_parameters())
    rows.append({"model": "toy (measured)", "svf_z": svf.num_z, "svf_bytes": z_bytes, "lora_ab": lora.num_z,
                 "lora_bytes": ab_bytes, "mlp_w_bytes": svf_w * 4, "qv_w_bytes": lora_w * 4,
                 "model_bytes": full_model * 4, "w_dtype": "fp32"})
    for name, s in LLAMA.items():
        h, m, L, kv = s["h"], s["m"], s["L"], s["kv"]
        svf_z = 3 * min(h, m) * L
        lora_ab = r * ((h + h) + (h + kv)) * L
        rows.append({"model": f"{name} (computed)", "svf_z": svf_z, "svf_bytes": svf_z * 4, "lora_ab": lora_ab,
                     "lora_bytes": lora_ab * 4, "mlp_w_bytes": 3 * h * m * L * 2, "qv_w_bytes": (h * h + kv * h) * L * 2,
                     "model_bytes": int(s["params"] * 2), "w_dtype": "bf16"})
    return rows


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.3g} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1000.0
    return str(b)


# -- the report -------------------------------------------------------------------------------
def machine() -> dict:
    import peft
    import torch
    import transformers

    try:
        import trl

        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_v, "peft": peft.__version__}


def fmt_acc(results: list[dict], task: str) -> str:
    """mean accuracy over seeds, pooled 95% Wilson interval, seed range."""
    if not results:
        return "—"
    accs = [r["eval"][task]["accuracy"] for r in results]
    k = sum(r["eval"][task]["correct"] for r in results)
    n = sum(r["eval"][task]["n"] for r in results)
    lo, hi = wilson(k, n)
    s = f"{100 * statistics.mean(accs):.1f} [{100 * lo:.1f}–{100 * hi:.1f}]"
    if len(accs) > 1:
        s += f" ({100 * min(accs):.1f}–{100 * max(accs):.1f}, n={len(accs)})"
    return s


def mean_of(results, key):
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.mean(vals) if vals else float("nan")


def ratio(a, b):
    return a / b if b else float("nan")


def paired_section(paired: list[dict]) -> list[str]:
    """Section 5: seconds per step of SVF, LoRA and TRL measured interleaved (same load)."""
    kinds = [(("trl", "lora"), "TRL GRPO + LoRA"), (("t2dist", "lora"), "t2dist LoRA"), (("t2dist", "svf"), "t2dist SVF")]
    got = {k: [r for r in paired if (r["runner"], r["kind"]) == k] for k, _ in kinds}
    if not all(got.values()):
        return []
    mean = {k: statistics.mean(r["s_per_step"] for r in v) for k, v in got.items()}
    loads = [r["load_end"] for r in paired]
    steps = paired[0].get("steps", "?")
    L = ["## 5. Paired timing (same conditions, interleaved)\n",
         f"The grid's seconds compare runs made minutes apart, under whatever load the shared machine had then. Here "
         f"SVF, LoRA (t2dist `train_local`) and TRL GRPO+LoRA run math for {steps} steps each (same prompts per step "
         f"and samples), interleaved SVF → LoRA → TRL, {max(r['round'] for r in paired) + 1} round(s); 1-min load "
         f"{min(loads):.1f}–{max(loads):.1f}.\n",
         "| run | s/step (mean over rounds) | peak RSS MB | s/step ratio to TRL |", "|---|---|---|---|"]
    for k, label in kinds:
        rss = statistics.mean(r["peak_rss_mb"] for r in got[k])
        L.append(f"| {label} | {mean[k]:.3f} | {rss:.0f} | {mean[k] / mean[('trl', 'lora')]:.2f} |")
    return L + [""]


def report(args, info, base, grid, trl_runs, traffic, started, load_note, total_s, paired=None) -> str:
    tasks = args.tasks
    L = []
    L.append(f"# SVF vs LoRA vs TRL GRPO+LoRA on the toy base — {started:%Y-%m-%d %H:%M} UTC\n")
    L.append(f"Command: `python bench/lora_vs_svf.py {' '.join(sys.argv[1:])}` — total {total_s / 60:.1f} min.\n")
    L.append(f"Machine: {info['cpu']}, {info['cores']} cores, no GPU; Python {info['python']}, torch {info['torch']}, "
             f"transformers {info['transformers']}, trl {info['trl']}, peft {info['peft']}.  "
             f"{args.threads} torch thread(s) per job, jobs run one after another.\n")
    L.append(f"Load: {load_note}\n")
    model = next((r["job"].get("model", "toy") for v in grid.values() for r in v), "toy")
    L.append(f"Base model: `{model}` ({base.get('base_info', 'toy base')}).\n")
    L.append(f"Setup: toy base (0.87M-param Llama, char tokenizer), synthetic tasks; every run {args.steps} steps × "
             f"{args.prompts} prompts × {args.samples} samples, temperature 1, the task's max new tokens, verifier "
             f"reward ±1, group-mean baseline, token-mean loss, Adam(W) with clip 1, beta 0. SVF: z on the 12 MLP "
             f"matrices, lr {args.svf_lr}. LoRA: r={args.lora_r}, alpha={args.lora_alpha}, dropout {args.lora_dropout} "
             f"on {args.lora_targets}, lr {args.lora_lr} (t2dist and TRL). t2dist rows are "
             f"`t2dist.rl.local.train_local` (one process, like TRL; the distributed trainer reproduces it exactly). "
             f"Accuracy: greedy, test split (first {args.eval_limit} per task), % with the 95% Wilson interval of "
             f"all seeds pooled and the range over seeds.\n")
    seeds_of = {t: sorted({r["job"]["seed"] for r in grid.get(("svf", t), [])}) for t in tasks}
    L.append("Seeds per task: " + ", ".join(f"{t} {seeds_of[t]}" for t in tasks) + ".\n")

    L.append("## 1. The paper's Table 1 in miniature\n")
    L.append("Each task column: the expert trained on that task, on its own test split.\n")
    L.append("| method | " + " | ".join(tasks) + " | trainable params | train s to final (mean over tasks) |")
    L.append("|---|" + "---|" * (len(tasks) + 2))
    L.append("| Base | " + " | ".join(fmt_acc([base], t) for t in tasks) + " | 0 | — |")
    for kind, label in (("lora", "LoRA (policy gradient)"), ("svf", "SVF (policy gradient)")):
        cells = [fmt_acc(grid.get((kind, t), []), t) for t in tasks]
        runs = [r for t in tasks for r in grid.get((kind, t), [])]
        params = runs[0]["trainable"] if runs else 0
        stf = statistics.mean([r["seconds_to_final"] for r in runs]) if runs else float("nan")
        L.append(f"| {label} | " + " | ".join(cells) + f" | {params:,} | {stf:.1f} |")
    L.append("")
    L.append("## 2. Collateral damage: every expert on every task\n")
    L.append("| expert | " + " | ".join(f"on {t}" for t in tasks) + " | train s | s to final | s/step | load |")
    L.append("|---|" + "---|" * (len(tasks) + 4))
    L.append("| Base | " + " | ".join(fmt_acc([base], t) for t in tasks) + " | — | — | — | — |")
    for kind in ("lora", "svf"):
        for t in tasks:
            runs = grid.get((kind, t), [])
            if not runs:
                continue
            cells = [("**" + fmt_acc(runs, u) + "**") if u == t else fmt_acc(runs, u) for u in tasks]
            L.append(f"| {kind.upper()} {t} | " + " | ".join(cells) + f" | {mean_of(runs, 'train_seconds'):.1f} | "
                     f"{mean_of(runs, 'seconds_to_final'):.1f} | {mean_of(runs, 's_per_step'):.3f} | "
                     f"{mean_of(runs, 'load_end'):.1f} |")
    L.append("\nBold: the training task. \"s to final\": training seconds (evaluations excluded) until the first "
             f"validation check (every {args.val_every} steps, {args.val_limit} examples) within 1 point of the last. "
             "load: the 1-min load average when the job ended (mean over seeds) — other work shared the CPU.\n")

    L.append("## 3. Against TRL (GRPOTrainer + peft LoRA), math\n")
    if trl_runs:
        svf_m, lora_m = grid.get(("svf", "math"), []), grid.get(("lora", "math"), [])
        rows = [("TRL GRPO + LoRA", trl_runs), ("t2dist LoRA", lora_m), ("t2dist SVF", svf_m)]
        L.append("| run | math test acc | train wall s | s to final | s/step | peak RSS MB | trainable params | seeds | load |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for label, rs in rows:
            if rs:
                L.append(f"| {label} | {fmt_acc(rs, 'math')} | {mean_of(rs, 'train_seconds'):.1f} | "
                         f"{mean_of(rs, 'seconds_to_final'):.1f} | {mean_of(rs, 's_per_step'):.3f} | "
                         f"{mean_of(rs, 'peak_rss_mb'):.0f} | {rs[0]['trainable']:,} | {len(rs)} | "
                         f"{mean_of(rs, 'load_end'):.1f} |")
        L.append("\nRatios t2dist / TRL (means over seeds):\n")
        L.append("| t2dist run | accuracy | train wall | s to final | s/step | peak RSS | trainable params |")
        L.append("|---|---|---|---|---|---|---|")
        tacc = statistics.mean(r["eval"]["math"]["accuracy"] for r in trl_runs)
        verdicts = []
        for label, rs in rows[1:]:
            if not rs:
                continue
            acc = statistics.mean(r["eval"]["math"]["accuracy"] for r in rs)
            L.append(f"| {label} | {ratio(acc, tacc):.2f} | {ratio(mean_of(rs, 'train_seconds'), mean_of(trl_runs, 'train_seconds')):.2f} | "
                     f"{ratio(mean_of(rs, 'seconds_to_final'), mean_of(trl_runs, 'seconds_to_final')):.2f} | "
                     f"{ratio(mean_of(rs, 's_per_step'), mean_of(trl_runs, 's_per_step')):.2f} | "
                     f"{ratio(mean_of(rs, 'peak_rss_mb'), mean_of(trl_runs, 'peak_rss_mb')):.2f} | "
                     f"{ratio(rs[0]['trainable'], trl_runs[0]['trainable']):.4f} |")
            if label == "t2dist SVF":
                verdicts = [("accuracy ≥ TRL's", acc >= tacc),
                            ("wall ≤ ½ TRL's", mean_of(rs, "train_seconds") <= 0.5 * mean_of(trl_runs, "train_seconds")),
                            ("≥ 10× fewer trainable params", rs[0]["trainable"] * 10 <= trl_runs[0]["trainable"])]
        if verdicts:
            L.append("\nIssue goal (t2dist SVF vs TRL): " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in verdicts) + ".\n")
    else:
        L.append("(TRL not run: `--trl-seeds` empty or TRL not installed.)\n")

    L.append("## 4. Weight-sync traffic per update (to each rollout actor)\n")
    L.append("| model | SVF z (MLP) | LoRA A+B (q,v) | full MLP targets | full q,v targets | whole model | "
             "full-MLP / z | full-q,v / LoRA |")
    L.append("|---|---|---|---|---|---|---|---|")
    for row in traffic:
        L.append(f"| {row['model']} | {row['svf_z']:,} values = {human(row['svf_bytes'])} | "
                 f"{row['lora_ab']:,} = {human(row['lora_bytes'])} | {human(row['mlp_w_bytes'])} ({row['w_dtype']}) | "
                 f"{human(row['qv_w_bytes'])} | {human(row['model_bytes'])} | "
                 f"{row['mlp_w_bytes'] / row['svf_bytes']:,.0f}× | {row['qv_w_bytes'] / row['lora_bytes']:,.0f}× |")
    L.append("\nz and LoRA tensors are sent in fp32 (what `RolloutWorker.set_expert` receives); a full-weight "
             "broadcast (OpenRLHF, TRL's vLLM sync, which merges the adapter and ships the weights) sends the target "
             "matrices in the model dtype (toy fp32, Llama bf16). Llama shapes: 8B hidden 4096, MLP 14336, 32 layers; "
             "70B hidden 8192, MLP 28672, 80 layers; 8 KV heads × 128. SVF full rank: min(out, in) values per matrix.\n")
    L += paired_section(paired or [])
    return "\n".join(L) + "\n"


def report_from(path: Path, args) -> int:
    """Rebuild the markdown from a saved JSON (the run's settings are read back from its jobs)."""
    data = json.loads(path.read_text())
    grid = {tuple(k.split("/")): v for k, v in data["grid"].items()}
    jobs = {r["job"]["kind"]: r["job"] for runs in grid.values() for r in runs}
    any_job = next(iter(jobs.values()))
    for key in ("steps", "prompts", "samples", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "eval_limit",
                "val_limit", "val_every", "threads"):
        setattr(args, key, any_job[key])
    args.svf_lr = jobs.get("svf", any_job)["lr"]
    args.lora_lr = jobs.get("lora", any_job)["lr"]
    args.tasks = any_job["eval_tasks"]
    old_md = path.with_suffix(".md").read_text() if path.with_suffix(".md").is_file() else ""
    import re

    m = re.search(r"— (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", old_md)
    if "started" in data:
        started = _dt.datetime.fromisoformat(data["started"])
    elif m:
        started = _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M")
    else:
        started = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)
    m = re.search(r"Command: `python bench/lora_vs_svf.py ?([^`]*)`", old_md)
    if "argv" not in data and m:
        data["argv"] = m.group(1).split()
    runs = [r for v in grid.values() for r in v] + data["trl"]
    m = re.search(r"— total ([\d.]+) min", old_md)
    total = data.get("total_seconds") or (60 * float(m.group(1)) if m else
                                          sum(r["wall_seconds"] for r in runs + [data["base"]]))
    loads = [r["load_end"] for r in runs]
    note = data.get("load_note") or (f"1-min load average {min(loads):.2f}–{max(loads):.2f} at the end of the jobs (on "
                                     f"{data['machine']['cores']} cores: the machine was shared with other work, so absolute "
                                     "seconds are inflated; the ratios compare runs made one after another).")
    argv = data.get("argv")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    md = report(args, data["machine"], data["base"], grid, data["trl"], data["traffic"], started, note, total,
                data.get("paired_timing"))
    for label, key in (("Not run (time limit)", "skipped"), ("Failed (see the bench log)", "failed")):
        if data.get(key):
            md += f"\n{label}: " + ", ".join(data[key]) + "\n"
    if data.get("notes"):  # a reading of the numbers, added by hand to the JSON
        md += "\n## Notes\n\n" + data["notes"].strip() + "\n"
    path.with_suffix(".md").write_text(md)
    print(md)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--job-out", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 4×4 samples, small eval limits, seed 0")
    ap.add_argument("--tasks", default=",".join(ALL_TASKS))
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the math and reasoning runs")
    ap.add_argument("--code-seeds", default=None, help="seeds of the code runs (default: --seeds); code is slow (sandbox)")
    ap.add_argument("--trl-seeds", default="0")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--svf-lr", type=float, default=1e-2)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--eval-limit", type=int, default=400)
    ap.add_argument("--val-limit", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="toy", help="base model directory ('toy': the embedded toy base); "
                    "a private copy keeps a long run safe from the toy being rebuilt meanwhile")
    ap.add_argument("--out", help="markdown file (default bench/results/<date>-lora-vs-svf.md; --quick: stdout only)")
    ap.add_argument("--report-from", metavar="JSON", help="rewrite the markdown next to a saved JSON from its numbers")
    ap.add_argument("--paired-rounds", type=int, default=2, help="rounds of the interleaved s/step comparison (0: none)")
    ap.add_argument("--paired-steps", type=int, default=20)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new job after this many minutes; the report says which runs were made")
    args = ap.parse_args()

    if args.job:
        res = run_job_here(json.loads(args.job))
        Path(args.job_out).write_text(json.dumps(res))
        return 0

    if args.report_from:
        return report_from(Path(args.report_from), args)
    if args.quick:
        args.steps, args.prompts, args.samples = 4, 4, 4
        args.eval_limit, args.val_limit, args.val_every = 40, 20, 2
        args.seeds, args.trl_seeds = "0", "0"
        args.paired_rounds, args.paired_steps = 1, 4
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    code_seeds = [int(s) for s in (args.code_seeds or args.seeds).split(",") if s.strip()]
    trl_seeds = [int(s) for s in args.trl_seeds.split(",") if s.strip()]
    started = _dt.datetime.now(_dt.timezone.utc)
    t_all = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    info = machine()
    load0 = os.getloadavg()
    log(f"[bench] {info}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    common = {"threads": args.threads, "eval_tasks": args.tasks, "eval_limit": args.eval_limit, "val_limit": args.val_limit,
              "val_every": args.val_every, "steps": args.steps, "prompts": args.prompts, "samples": args.samples,
              "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "lora_targets": args.lora_targets, "model": args.model}
    traffic = traffic_rows(args.lora_r)
    # order: what the comparison needs most comes first (math seed 0 and TRL), so that a run cut
    # short by --max-minutes still reports every section; the report is rewritten after every job
    plan: list[dict] = []
    first_seed = {t: (code_seeds if t == "code" else seeds)[:1] for t in args.tasks}
    rounds = [first_seed] + [{t: (code_seeds if t == "code" else seeds)[i:i + 1] for t in args.tasks}
                             for i in range(1, max(len(seeds), len(code_seeds)))]
    for i, rnd in enumerate(rounds):
        for task in args.tasks:
            for seed in rnd[task]:
                for kind in ("svf", "lora"):
                    plan.append({**common, "runner": "t2dist", "kind": kind, "task": task, "seed": seed,
                                 "lr": args.svf_lr if kind == "svf" else args.lora_lr})
        if i == 0 and trl_seeds:
            plan.insert(2 if args.tasks and args.tasks[0] == "math" else len(plan),
                        {**common, "runner": "trl", "kind": "lora", "task": "math", "seed": trl_seeds[0], "lr": args.lora_lr})
    plan += [{**common, "runner": "trl", "kind": "lora", "task": "math", "seed": s, "lr": args.lora_lr} for s in trl_seeds[1:]]
    try:
        import trl  # noqa: F401
    except ImportError:
        log("[bench] trl is not installed (pip install -e .[bench]); skipping the TRL comparison")
        plan = [j for j in plan if j["runner"] != "trl"]

    out = None
    if args.out or not args.quick:
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{started:%Y-%m-%d}-lora-vs-svf.md"
        out.parent.mkdir(parents=True, exist_ok=True)
    base = run_job({**common, "runner": "base", "seed": 0}, log)
    if base is None:
        raise SystemExit("the base-model evaluation failed (see above)")
    grid: dict[tuple[str, str], list[dict]] = {}
    trl_runs: list[dict] = []
    loads: list[float] = []
    skipped: list[str] = []
    failed: list[str] = []
    md = ""
    load_note = ""
    for n, job in enumerate(plan):
        if args.max_minutes is not None and time.perf_counter() - t_all > 60 * args.max_minutes:
            skipped = [f"{j['runner']}/{j['kind']}/{j['task']}/seed {j['seed']}" for j in plan[n:]]
            log(f"[bench] --max-minutes {args.max_minutes} reached; not run: {', '.join(skipped)}")
            break
        res = run_job(job, log)
        if res is None:
            failed.append(f"{job['runner']}/{job['kind']}/{job['task']}/seed {job['seed']}")
            continue
        loads.append(res["load_end"])
        if job["runner"] == "trl":
            trl_runs.append(res)
        else:
            grid.setdefault((job["kind"], job["task"]), []).append(res)
        load1 = os.getloadavg()
        load_note = (f"1-min load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end, "
                     f"{min(loads, default=0):.2f}–{max(loads, default=0):.2f} at the end of the jobs "
                     f"(on {info['cores']} cores: the machine was shared with other work, so absolute seconds are "
                     f"inflated; the ratios compare runs made under the same conditions, one after another).")
        if n + 1 < len(plan):
            load_note += f" Report after {n + 1} of {len(plan)} jobs."
        md = report(args, info, base, grid, trl_runs, traffic, started, load_note, time.perf_counter() - t_all)
        if failed:
            md += "\nFailed (see the bench log): " + ", ".join(failed) + "\n"
        if out is not None:
            out.write_text(md)
            out.with_suffix(".json").write_text(json.dumps(
                {"started": started.isoformat(), "total_seconds": time.perf_counter() - t_all, "argv": sys.argv[1:],
                 "load_note": load_note, "skipped": skipped, "failed": failed, "base": base, "grid": {f"{k}/{t}": v for (k, t), v in grid.items()}, "trl": trl_runs,
                 "traffic": traffic, "machine": info}, indent=1))
    paired: list[dict] = []
    have_trl = any(j["runner"] == "trl" for j in plan)
    for rnd in range(args.paired_rounds if have_trl else 0):
        for runner, kind, lr in (("t2dist", "svf", args.svf_lr), ("t2dist", "lora", args.lora_lr), ("trl", "lora", args.lora_lr)):
            job = {**common, "runner": runner, "kind": kind, "task": "math", "seed": 0, "lr": lr, "steps": args.paired_steps,
                   "eval_tasks": ["math"], "eval_limit": 20, "val_limit": 20, "val_every": args.paired_steps}
            res = run_job(job, log)
            if res is not None:
                paired.append({"runner": runner, "kind": kind, "round": rnd, "steps": args.paired_steps,
                               "s_per_step": res["s_per_step"], "load_start": res["load_start"],
                               "load_end": res["load_end"], "peak_rss_mb": res["peak_rss_mb"]})
    if paired:
        md = report(args, info, base, grid, trl_runs, traffic, started, load_note, time.perf_counter() - t_all, paired)
        if failed:
            md += "\nFailed (see the bench log): " + ", ".join(failed) + "\n"
    if out is not None and (paired or skipped):
        if skipped:
            md += "\nNot run (time limit): " + ", ".join(skipped) + "\n"
        out.write_text(md)
        data = json.loads(out.with_suffix(".json").read_text())
        data.update(paired_timing=paired, total_seconds=time.perf_counter() - t_all, skipped=skipped)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(md)
    if out is not None:
        log(f"[bench] wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
