"""Where the time and bytes of the distributed pipeline go, as ratios measured in one run.

    python bench/pipeline.py [--steps 5] [--task math] [--repeat 3] [--prompts 32] [--samples 8]

Sections (all in one process, one local Ray cluster; compare the ratios, not the seconds):

1. Per-step time split of a short real ``t2dist.orchestration.train.train`` run on ``configs/demo.yaml``
   (2 rollout actors, 2 DeepSpeed learner ranks, evaluator), read back from the final
   checkpoint's ``state.json``: rollout (z put + set_expert + generate + score + Ray) and
   learner (shard shipping + DeepSpeed step + get_z) seconds, median and share of the step.
   The history does not split generate/score or time the z sync, so those rows come from
   direct RolloutWorker calls in section 2 (``RolloutBatch.seconds`` and a timed
   ``set_expert`` round trip).
2. Rollout throughput: 2 ``RolloutWorker`` actors x 1 thread on ``--prompts`` x ``--samples``
   vs one plain ``model.generate(do_sample=True, temperature=1)`` loop in this process with
   2 threads (and, for context, with 1 thread, and ``t2dist.engines.generation.generate`` with 2).
3. Scaling: the same work on 1 actor vs split over 2 (ideal speedup 2.0 on 2 idle cores).
4. Bytes of one weight sync (z of all targets, fp32) vs the target weights a full-weight
   broadcast would send, for the toy and analytically for Llama-3-8B.

Runs of sections 2-3 are interleaved (plain, 2 actors, 1 actor, ... per repeat) so that
load from other processes hits all of them alike; medians of ``--repeat`` after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy while this process sleeps (``/proc/stat`` over ``seconds``): other processes' load."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


# -- section 1: a short real training run ----------------------------------------------------
def run_training(cfg):
    from t2dist.orchestration.checkpoint import latest_checkpoint, load_checkpoint
    from t2dist.orchestration.train import train

    t0 = time.perf_counter()
    summary = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    ckpt = latest_checkpoint(cfg.run_dir)
    _, state = load_checkpoint(ckpt)
    return state["history"], summary, wall


def print_training(history, summary, wall):
    steps = len(history)
    step_s = med([h["step_s"] for h in history])
    roll = med([h["rollout_s"] for h in history])
    learner = med([h["learner_s"] for h in history])
    learn_rank = med([h.get("learn_s", float("nan")) for h in history])
    sync_bytes = med([h["sync_bytes"] for h in history])
    print(f"\n### 1. Per-step time split of `t2dist.orchestration.train.train` (configs/demo.yaml, {steps} steps)\n")
    print(f"Whole `train()` call {wall:.1f} s (actor/learner start-up, base + validation + test evaluations "
          f"included); train loop {summary.get('train_seconds', float('nan')):.1f} s. Medians over the {steps} "
          f"steps from the final checkpoint's `state.json`; step 1 alone took {history[0]['step_s']:.2f} s "
          f"(it runs beside the evaluator's base-model test evaluation).\n")
    print("| part | median s | share of step |")
    print("|---|---:|---:|")
    print(f"| whole step (`step_s`) | {step_s:.3f} | 100% |")
    sync_med = med([h["sync_s"] for h in history])
    gen = med([h["generate_s"] for h in history])
    score = med([h["scoring_s"] for h in history])
    print(f"| z sync (`sync_s`: put + every actor's `set_expert`, W' recomposed) | {sync_med:.4f} | {sync_med / step_s:.1%} |")
    print(f"| rollout (`rollout_s`: generate + score + Ray) | {roll:.3f} | {roll / step_s:.0%} |")
    print(f"| ├ generate (`generate_s`, slowest actor) | {gen:.3f} | {gen / step_s:.0%} |")
    print(f"| ├ score (`scoring_s`, verifier, slowest actor) | {score:.4f} | {score / step_s:.1%} |")
    print(f"| learner (`learner_s`: ship shards + DeepSpeed step + `get_z`) | {learner:.3f} | {learner / step_s:.0%} |")
    print(f"| ├ inside the rank (`learn_s`, max over ranks) | {learn_rank:.3f} | {learn_rank / step_s:.0%} |")
    print(f"| ├ Ray + get_z around it (`learner_s - learn_s`) | {learner - learn_rank:.3f} "
          f"| {(learner - learn_rank) / step_s:.0%} |")
    print(f"\nsync bytes per step (`sync_bytes`: z to every actor): {sync_bytes:,.0f} B; rollout tokens/s in "
          f"training (median `tokens_per_s`): {med([h['tokens_per_s'] for h in history]):,.0f}; "
          f"test accuracy base {summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
          f"(n={summary['n_test']}, not the point here).")
    print("\nper step (s): " + ", ".join(f"{h['step']}: {h['rollout_s']:.2f} + {h['learner_s']:.2f}" for h in history)
          + "  (rollout + learner)")


# -- sections 2 and 3 -------------------------------------------------------------------------
def plain_generate(model, tok, prompts, samples, max_new, batch_size, threads):
    """Plain transformers sampling loop; returns new tokens (up to and incl. eos, no padding)."""
    torch.set_num_threads(threads)
    rows = [p for p in prompts for _ in range(samples)]
    pad = tok.pad_token_id
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            enc = tok(rows[start:start + batch_size], return_tensors="pt", padding=True)  # toy tokenizer pads left
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new,
                                 pad_token_id=pad)
            new = out[:, enc["input_ids"].shape[1]:]
            tokens += int((new != pad).sum())
    return tokens


def split_examples(examples, n):
    bounds = [round(k * len(examples) / n) for k in range(n + 1)]
    return [examples[bounds[i]:bounds[i + 1]] for i in range(n)]


def bench_rollout(cfg, svf, tok, task, args):
    import ray

    from actors.rollout import RolloutWorker
    from t2dist.config import dump_config
    from t2dist.engines.generation import generate

    cfg_dict = dump_config(cfg)
    t0 = time.perf_counter()
    actors = [ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg_dict, i) for i in range(2)]
    infos = ray.get([a.ready.remote() for a in actors])
    start_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    z = {n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in svf.init_z(1.0).items()}  # neutral-ish
    svf.merge_(z)  # the plain loop samples from the same W'(z) as the actors
    examples = task.examples("train")[: args.prompts]
    prompts = [task.format_prompt(e) for e in examples]
    max_new = cfg.task.max_new_tokens or task.max_new_tokens
    bs = cfg.rollout.batch_size

    others = busy_cores()  # actors idle, this process asleep
    version = [0]

    def sync():
        version[0] += 1
        t = time.perf_counter()
        ref = ray.put(z)
        ray.get([a.set_expert.remote(ref, version[0]) for a in actors])
        return time.perf_counter() - t

    def sync_cached():  # same version: RPC + transfer only, no merge
        t = time.perf_counter()
        ref = ray.put(z)
        ray.get([a.set_expert.remote(ref, version[0]) for a in actors])
        return time.perf_counter() - t

    def actors_run(n, seed):
        chunks = split_examples(examples, n)
        t = time.perf_counter()
        batches = ray.get([actors[i].rollout.remote(chunks[i], seed + 7919 * i) for i in range(n)])
        wall = time.perf_counter() - t
        return wall, batches

    res = {k: [] for k in ("plain2", "plain1", "t2d2", "act2", "act1")}
    toks = {k: [] for k in res}
    gen2, score2, gen1, score1, sync_s, sync_c = [], [], [], [], [], []
    for r in range(args.repeat + 1):  # r == 0: warm-up
        sync_s.append(sync())
        sync_c.append(sync_cached())
        torch.manual_seed(r)
        t = time.perf_counter()
        n = plain_generate(svf.model, tok, prompts, args.samples, max_new, bs, threads=2)
        res["plain2"].append(time.perf_counter() - t)
        toks["plain2"].append(n)
        t = time.perf_counter()
        n = plain_generate(svf.model, tok, prompts, args.samples, max_new, bs, threads=1)
        res["plain1"].append(time.perf_counter() - t)
        toks["plain1"].append(n)
        torch.set_num_threads(2)
        t = time.perf_counter()
        comps = generate(svf.model, tok, prompts, num_samples=args.samples, temperature=1.0,
                         max_new_tokens=max_new, stop=task.stop, batch_size=bs, seed=r)
        res["t2d2"].append(time.perf_counter() - t)
        toks["t2d2"].append(sum(len(c.completion_ids) for c in comps))
        wall, batches = actors_run(2, 100 + r)
        res["act2"].append(wall)
        toks["act2"].append(sum(b.num_tokens for b in batches))
        gen2.append(max(b.seconds["generate"] for b in batches))
        score2.append(max(b.seconds["score"] for b in batches))
        wall, batches = actors_run(1, 100 + r)
        res["act1"].append(wall)
        toks["act1"].append(batches[0].num_tokens)
        gen1.append(batches[0].seconds["generate"])
        score1.append(batches[0].seconds["score"])
    for d in (res, toks):
        for k in d:
            d[k] = d[k][1:]
    gen2, score2, gen1, score1, sync_s, sync_c = (x[1:] for x in (gen2, score2, gen1, score1, sync_s, sync_c))
    for a in actors:
        ray.kill(a)
    torch.set_num_threads(2)
    return dict(res=res, toks=toks, gen2=gen2, score2=score2, gen1=gen1, score1=score1, sync_s=sync_s,
                sync_c=sync_c, start_s=start_s, infos=infos, others=others, max_new=max_new, bs=bs, z=z)


def print_rollout(b, args):
    res, toks = b["res"], b["toks"]
    work = f"{args.prompts} prompts x {args.samples} samples"
    rate = {k: med(toks[k]) / med(res[k]) for k in res}
    sps = {k: args.prompts * args.samples / med(res[k]) for k in res}
    print(f"\n### 2. Rollout throughput: 2 actors x 1 thread vs a plain `generate` loop ({work}, "
          f"T=1, max_new_tokens {b['max_new']}, batch {b['bs']})\n")
    print(f"Median of {args.repeat} after a warm-up; actor start-up (model + factors from cache) took "
          f"{b['start_s']:.1f} s. Actors stop a row at the task's stop string (newline) or eos; the plain loop "
          "stops only at eos, so it may generate more tokens per row: compare samples/s as well as tokens/s.")
    if b["others"] is not None:
        print(f"Just before these runs other processes kept {b['others']:.1f} of {os.cpu_count()} cores busy "
              "(1 s `/proc/stat` sample with this bench idle); with less than 2 free cores, 2-thread OpenMP "
              "loops can slow down many-fold (threads spin waiting for a preempted peer) and 2 actors cannot "
              "beat 1.")
    print()
    print("| way | threads | median s | new tokens | tokens/s | samples/s | tokens/s vs plain (2 thr) "
          "| samples/s vs plain (2 thr) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("plain2", "plain `model.generate` loop, this process", 2),
            ("plain1", "plain `model.generate` loop, this process", 1),
            ("t2d2", "`t2dist.engines.generation.generate`, this process", 2),
            ("act2", "2 RolloutWorker actors (`rollout`, incl. scoring + Ray)", "2 x 1"),
            ("act1", "1 RolloutWorker actor (all the work)", 1)]
    for k, label, thr in rows:
        print(f"| {label} | {thr} | {med(res[k]):.3f} | {med(toks[k]):,.0f} | {rate[k]:,.0f} | {sps[k]:,.0f} "
              f"| {rate[k] / rate['plain2']:.2f} | {sps[k] / sps['plain2']:.2f} |")
    g2, s2 = med(b["gen2"]), med(b["score2"])
    gen_rate = med(toks["act2"]) / g2
    print(f"\nInside the 2 actors (slowest actor, `RolloutBatch.seconds`): generate {g2:.3f} s, score {s2:.4f} s "
          f"({s2 / (g2 + s2):.1%} of generate+score); generate-only rate {gen_rate:,.0f} tokens/s = "
          f"{gen_rate / rate['plain2']:.2f} x plain (2 thr). Ray + result transfer on top: "
          f"{med(res['act2']) - g2 - s2:.3f} s ({(med(res['act2']) - g2 - s2) / med(res['act2']):.0%} of the actor wall "
          "time).")
    print(f"\nz sync to 2 actors (`ray.put` + `set_expert` round trip): {med(b['sync_s']) * 1e3:.1f} ms with a new "
          f"version (recomposes W'), {med(b['sync_c']) * 1e3:.1f} ms for an already-merged version (transfer + RPC only).")

    t1, t2 = med(res["act1"]), med(res["act2"])
    gs1, gs2 = med(b["gen1"]), med(b["gen2"])
    print(f"\n### 3. Scaling: the same {work} on 1 actor vs split over 2 (1 thread each)\n")
    print("| measure | 1 actor s | 2 actors s | speedup (ideal 2.0) |")
    print("|---|---:|---:|---:|")
    print(f"| wall time of the rollout call(s) | {t1:.3f} | {t2:.3f} | {t1 / t2:.2f} |")
    print(f"| generate only (slowest actor) | {gs1:.3f} | {gs2:.3f} | {gs1 / gs2:.2f} |")


# -- section 4 ---------------------------------------------------------------------------------
def print_bytes(svf, history):
    from actors.rollout import z_nbytes

    z = {n: v.float() for n, v in svf.init_z(1.0).items()}
    zb = z_nbytes(z)
    wb = sum(svf.base_weight(n).numel() * svf.base_weight(n).element_size() for n in svf.targets)
    wdt = svf.base_weight(svf.targets[0]).dtype
    model_b = sum(p.numel() * p.element_size() for p in svf.model.parameters())
    # Llama-3-8B: 32 layers, hidden 4096, MLP 14336; gate/up/down, z length min(out, in) = 4096 each
    L, H, M = 32, 4096, 14336
    z8 = L * 3 * min(H, M)
    w8 = L * 3 * H * M
    params8 = 8_030_261_248
    print("\n### 4. Bytes per weight sync: z (fp32) vs a full-weight broadcast\n")
    print("| model | targets | z values | z bytes (fp32) | target weight bytes | weights / z | whole model bytes "
          "| model / z |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| toy (measured, {str(wdt).replace('torch.', '')} weights) | {svf.target_spec}: {len(svf.targets)} matrices "
          f"| {svf.num_z:,} | {fmt_bytes(zb)} | {fmt_bytes(wb)} | {wb / zb:,.0f} | {fmt_bytes(model_b)} "
          f"| {model_b / zb:,.0f} |")
    print(f"| Llama-3-8B (analytic, bf16 weights) | mlp gate/up/down: {L * 3} matrices | {z8:,} | {fmt_bytes(z8 * 4)} "
          f"| {fmt_bytes(w8 * 2)} | {w8 * 2 / (z8 * 4):,.0f} | {fmt_bytes(params8 * 2)} | {params8 * 2 / (z8 * 4):,.0f} |")
    if history:
        sb = med([h["sync_bytes"] for h in history])
        print(f"\nThe training run's `sync_bytes` per step was {sb:,.0f} B = {sb / zb:.0f} x the z of one actor "
              f"(z goes to every actor; through Ray's object store it is put once per step).")


# -- main --------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="RL steps of the training run in section 1")
    ap.add_argument("--task", default="math")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats of sections 2-3 (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--skip-train", action="store_true", help="skip section 1")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)
    torch.set_num_threads(2)
    import deepspeed  # noqa: F401  (version only; the learner ranks import it themselves)
    import ray
    import transformers

    print("## Distributed pipeline: time split, rollout throughput, scaling, sync bytes (one run)\n")
    print(f"- torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, "
          f"deepspeed {deepspeed.__version__}")
    print(f"- {platform.platform()}, {platform.machine()}, python {platform.python_version()}, "
          f"cpu_count {os.cpu_count()}, processor '{platform.processor() or '?'}'")
    load = os.getloadavg()
    print(f"- load average before start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    others = busy_cores()
    if others is not None:
        print(f"- cores busy with other processes before start (1 s sample): {others:.1f} of {os.cpu_count()}")
    if load[0] > 0.5 or (others or 0) > 0.3:
        print("- WARNING: other processes are using the CPUs. Every actor/learner/loop here wants a core of its "
              "own, so the scaling ratio (ideal 2.0) and the actor-vs-plain ratios shift toward whoever needs "
              "fewer cores; compare against a quiet run.")

    from t2dist.config import load_config
    from t2dist.policy.load import load_policy
    from t2dist.tasks import get_task
    from t2dist.orchestration.train import resources_needed

    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="t2dist-bench-pipeline-")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"task.name={args.task}", f"rl.steps={args.steps}", "eval.limit=40", "train.eval_limit=40",
        f"run_dir={tmp.name}/run", f"svf.cache_dir={tmp.name}/factors", "ray.address=local",
    ])
    need = int(resources_needed(cfg)["CPU"] + 0.999)
    ray.init(num_cpus=max(4, need), include_dashboard=False, log_to_driver=True, logging_level="ERROR")
    print(f"- local Ray with {max(4, need)} logical CPUs (the demo run needs {need}) on {os.cpu_count()} cores; "
          f"task `{args.task}`")

    history, summary, wall = [], {}, 0.0
    if not args.skip_train:
        history, summary, wall = run_training(cfg)
    svf, tok = load_policy(cfg)  # factors from the run's cache
    task = get_task(cfg.task.name)
    b = bench_rollout(cfg, svf, tok, task, args)
    if history:
        print_training(history, summary, wall)
    print_rollout(b, args)
    print_bytes(svf, history)
    load = os.getloadavg()
    print(f"\nWhole bench {time.perf_counter() - t_all:.0f} s; 1-min load average at the end {load[0]:.2f}.")
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
