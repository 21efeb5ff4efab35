"""Rollout engines side by side: today's HF path, the HF shared-prefix engine and the vLLM engine.

    python bench/rollout_engines.py --json FILE [--models smollm2,toy] [--prompts 8] [--samples 8]
                                    [--max-new-tokens 8] [--greedy 200] [--repeat 2]
    python bench/rollout_engines.py --config configs/smollm2-pyfunc.yaml --json FILE   # a run's shape

``--config``: one run config instead of ``--models``: its model, SVF targets and task, and (unless given)
its prompts per step, samples per prompt, new-token limit and temperature; ``--task`` names another task.

For each model, in one process and one run (interleaved per repeat, so other load hits all alike):

* ``hf_samples_per_s`` — ``t2dist.engines.generation.generate`` (``model.generate``, one prefill per sample);
* ``hf_shared_prefix_samples_per_s`` — the HF engine (one prefill per prompt, KV cache expanded);
* ``vllm_samples_per_s`` — the vLLM engine (``SamplingParams(n=...)``, prefix caching), W'(z) set;
* ``vllm_vs_hf`` / ``shared_prefix_vs_hf`` — the ratios (goals on SmolLM2: >= 3 and >= 2);
* ``greedy_agreement`` — share of greedy completions equal between vLLM and HF (same non-neutral z):
  200 toy math test prompts; the ARC-Easy prompts for SmolLM2;
* ``z_update_ms`` — z arriving to W' ready in vLLM's worker (RPC, recomposition, CPU prepack, prefix
  cache reset; median of 5), ``z_update_share`` — that over one vLLM rollout of this size (goal <= 5%);
* ``z_update_bytes`` (the z payload), ``target_weight_bytes`` (the target matrices a weight sync would
  otherwise ship) and ``full_weight_bytes`` (every parameter: shipping the model).

SmolLM2 prompts: ARC-Easy test questions through the chat template (t2dist.tasks ``arc_easy``,
~130 tokens), sampled at temperature 1; the toy: math test prompts.  Compare ratios, not seconds:
the script records the load average, and on a shared 2-core machine absolute times swing.
vLLM spawns its engine process, hence the ``__main__`` guard.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model -> (its run config: model and SVF targets, the task). SmolLM2: the project's ARC-Easy recipe
# (MLP of the last 10 of 30 layers, 30 targets); the toy: the demo (MLP of all 4 layers, 12 targets).
MODELS = {"smollm2": ("configs/smollm2-arc_easy.yaml", "arc_easy"), "toy": ("configs/demo.yaml", "math")}


def _z(policy, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {k: v * (1 + spread * torch.randn(v.shape, generator=g)) for k, v in policy.neutral_z().items()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def gemm_gflops(rows: int, r: int, cols: int, repeat: int = 8) -> float:
    """This machine's float32 rate on one recomposition GEMM (``addmm``: rows × r times r × cols), best of ``repeat``."""
    U, V, d, W = torch.randn(rows, r), torch.randn(cols, r), torch.randn(r), torch.randn(rows, cols)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.addmm(W, U, (V * d).T)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * r * cols / best / 1e9


def _prompts(task, tok, n: int):
    return [task.prompt_for(e, tok) for e in task.examples("test")[:n]]


def bench_model(name: str, config: str, task_name: str, args) -> dict:
    from t2dist.config import load_config
    from t2dist.engines import make_engine
    from t2dist.engines.generation import generate, generate_shared
    from t2dist.tasks import get_task

    from t2dist.policy.load import load_policy

    cfg = load_config(ROOT / config, [f"task.name={task_name}", "rollout.engine=vllm",
                             f"svf.cache_dir={args.cache_dir}", f"rollout.batch_size={args.prompts * args.samples}",
                             f"model.device={args.device}", f"model.dtype={args.dtype}",
                             f"rollout.vllm.tensor_parallel_size={args.tp}",
                             f"rollout.vllm.cpu_threads_bind={args.vllm_bind or f'0-{args.threads - 1}'}",
                             f"rollout.vllm.max_num_batched_tokens={args.vllm_tokens}",
                             *([f"svf.rank={args.svf_rank}"] if args.svf_rank else [])])
    task = get_task(task_name)
    policy, tok = load_policy(cfg)  # the HF paths' model (on --device); the vLLM engine shares its factor cache
    t0 = time.perf_counter()
    vl = make_engine(cfg, policy=policy, tokenizer=tok)
    start_s = time.perf_counter() - t0
    z = _z(policy)
    policy.merge_(z, "bench")  # the HF paths in this process sample from the same W'(z)
    z_bytes = vl.set_z(z, "bench")
    prompts = _prompts(task, tok, args.prompts)
    kw = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, stop=task.stop)
    n_samples = len(prompts) * args.samples
    runs = {"hf": [], "shared": [], "vllm": []}
    last = {}  # each path's completions of the last repeat (their mean length: samples stop at different points)
    vl.generate(prompts[:1], n=2, seed=0, **kw)  # warm-up (first request)
    for r in range(args.repeat):
        last["hf"], t = _timed(lambda: generate(policy.model, tok, prompts, num_samples=args.samples, seed=r,
                                                batch_size=n_samples, **kw))
        runs["hf"].append(t)
        last["shared"], t = _timed(lambda: generate_shared(policy.model, tok, prompts, num_samples=args.samples,
                                                           seed=r, batch_size=n_samples, **kw))
        runs["shared"].append(t)
        last["vllm"], t = _timed(lambda: vl.generate(prompts, n=args.samples, seed=r, **kw))
        runs["vllm"].append(t)
    sec = {k: statistics.median(v) for k, v in runs.items()}
    greedy_prompts = _prompts(task, tok, args.greedy if cfg.model.path == "toy" else max(args.prompts, args.greedy_smollm2))
    gkw = dict(max_new_tokens=args.max_new_tokens, stop=task.stop)
    ref = generate_shared(policy.model, tok, greedy_prompts, batch_size=64, **gkw)
    got = vl.generate(greedy_prompts, **gkw)
    agree = sum(a.completion_ids == b.completion_ids for a, b in zip(ref, got)) / len(ref)
    ms, parts = [], []
    for i in range(5):
        vl.set_z(_z(policy, seed=i + 1), ("update", i))
        ms.append(vl.last_update_ms)
        parts.append(vl.last_update_detail)
    z_ms = statistics.median(ms)
    rows_r_cols = sum(f.U.shape[0] * f.U.shape[1] * f.V.shape[0] for f in policy.factors.values())
    f0 = next(iter(policy.factors.values()))
    gflops = gemm_gflops(f0.U.shape[0], f0.U.shape[1], f0.V.shape[0])  # this process's threads (--threads)
    weights = [policy.model.get_submodule(n).weight for n in policy.targets]
    targets = sum(w.numel() * w.element_size() for w in weights)
    full = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    policy.unmerge_()
    vl.close()
    return {
        "model": cfg.model.path, "config": config, "svf_targets": cfg.svf.targets, "device": args.device,
        "dtype": args.dtype, "task": task_name, "prompts": len(prompts), "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "prompt_tokens_mean": statistics.mean(len(tok(p)["input_ids"]) for p in prompts),
        "hf_new_tokens_mean": statistics.mean(len(c.completion_ids) for c in last["shared"]),
        "vllm_new_tokens_mean": statistics.mean(len(c.completion_ids) for c in last["vllm"]),
        "targets": len(policy.targets), "num_z": policy.num_z,
        "hf_samples_per_s": n_samples / sec["hf"], "hf_shared_prefix_samples_per_s": n_samples / sec["shared"],
        "vllm_samples_per_s": n_samples / sec["vllm"],
        "vllm_vs_hf": sec["hf"] / sec["vllm"], "shared_prefix_vs_hf": sec["hf"] / sec["shared"],
        "greedy_agreement": agree, "greedy_prompts": len(ref),
        "z_update_ms": z_ms, "z_update_share": z_ms / (1000 * sec["vllm"]),
        "z_update_worker_ms": statistics.median(p["ms"] for p in parts),
        "z_update_recompose_ms": statistics.median(p["recompose_ms"] for p in parts),
        "z_update_repack_ms": statistics.median(p["repack_ms"] for p in parts),
        "svf_rank": policy.rank, "z_update_gflop": 2 * rows_r_cols / 1e9, "fp32_gemm_gflops": gflops,
        "z_update_gemm_bound_ms": 2 * rows_r_cols / 1e9 / gflops * 1000,
        "z_update_bytes": z_bytes, "target_weight_bytes": targets, "full_weight_bytes": full,
        "vllm_start_s": start_s, "seconds": sec,
    }


def benched(args, ap) -> list[tuple[str, str, str]]:
    """``(label, config, task)`` of each model to bench; fills the shape arguments left out (from ``--config``)."""
    from t2dist.config import load_config

    shape = {"prompts": 8, "samples": 8, "max_new_tokens": 4, "temperature": 1.0}
    if args.config:
        cfg = load_config(args.config)
        shape = {"prompts": cfg.rl.prompts_per_step, "samples": cfg.rl.samples_per_prompt,
                 "max_new_tokens": cfg.task.max_new_tokens or get_task_default(args.task or cfg.task.name),
                 "temperature": cfg.rl.temperature}
    for key, value in shape.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.config:
        return [(Path(args.config).stem, args.config, args.task or load_config(args.config).task.name)]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in MODELS:
            ap.error(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")
    return [(name, MODELS[name][0], args.task or MODELS[name][1]) for name in names]


def get_task_default(task: str) -> int:
    from t2dist.tasks import get_task

    return get_task(task).max_new_tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--models", default="smollm2,toy")
    ap.add_argument("--config", help="a run config: its model, targets, task and shape instead of --models")
    ap.add_argument("--task", help="the task whose test prompts are sampled (default: the model's or --config's)")
    ap.add_argument("--prompts", type=int, help="prompts per batch (default 8, or --config's rl.prompts_per_step)")
    ap.add_argument("--samples", type=int, help="samples per prompt (default 8, or --config's rl.samples_per_prompt)")
    ap.add_argument("--max-new-tokens", type=int,
                    help="new tokens per sample (default 4, the issue's measurement: ARC answers are one letter; "
                         "or --config's task.max_new_tokens)")
    ap.add_argument("--temperature", type=float, help="sampling temperature (default 1, or --config's rl.temperature)")
    ap.add_argument("--greedy", type=int, default=200, help="toy greedy-agreement prompts")
    ap.add_argument("--greedy-smollm2", type=int, default=32, help="SmolLM2 greedy-agreement ARC prompts")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--svf-rank", type=int, help="svf.rank (truncated SVD; default: the config's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="model.device of the HF paths and the vLLM engine (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", help="model.dtype (bfloat16 on a GPU; z stays float32)")
    ap.add_argument("--tp", type=int, default=1, help="rollout.vllm.tensor_parallel_size")
    ap.add_argument("--vllm-tokens", type=int, default=16384,
                    help="rollout.vllm.max_num_batched_tokens: room for 8 ARC prompts x 8 samples in one step")
    ap.add_argument("--vllm-bind", help="rollout.vllm.cpu_threads_bind (default 0-<threads-1>: the cores HF uses)")
    ap.add_argument("--cache-dir", default=str(Path(os.environ.get("T2DIST_CACHE", "~/.cache/t2dist")).expanduser()
                                               / "factors"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "load_avg_start": os.getloadavg(),
           "args": vars(args), "models": {}}
    for name, config, task in benched(args, ap):
        out["models"][name] = res = bench_model(name, config, task, args)
        print(f"\n## {name} ({res['task']}, {res['prompts']} prompts x {res['samples_per_prompt']} samples, "
              f"~{res['prompt_tokens_mean']:.0f} prompt tokens, {res['max_new_tokens']} new tokens, T={res['temperature']})")
        print("| key | value |\n| --- | --- |")
        for k, v in res.items():
            if k not in ("model", "task", "seconds"):
                print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    out["load_avg_end"] = os.getloadavg()
    print(f"\nload average start {out['load_avg_start']}, end {out['load_avg_end']} on {out['cpus']} CPUs")
    if args.json:
        from t2dist.atomic import atomic_write_json

        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
