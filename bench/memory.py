"""Per-rank memory of the learner with sharded SVF factors (t2dist/svf/sharded.py): measured, then analytic.

    python bench/memory.py                      # toy base, real learner ranks at R=1 and R=2 (CPU, gloo)
    python bench/memory.py --model PATH         # a local Hugging Face model directory
    python bench/memory.py --analytic-only      # only the Llama-3-8B / 70B table

1. **Measured** — real ``LearnerWorker`` ranks (Ray actors, DeepSpeed engines over gloo) report
   the bytes they hold: factors (their U, V columns plus S), target weights (their rows of W),
   the rest of the base model (replicated), and the bytes they copied out of the factor cache.
   R=1 unsharded (``SVFModel``: full factors, full W) is the reference; the ratio column is the
   per-rank factor bytes over ``total / R`` (the goal: at most 1.1). The last column is the median
   learner step (the slowest rank's ``train_step``) on a random batch of the demo's shape: what the
   per-layer activation exchange of the sharded layer costs next to the unsharded path.
2. **Analytic** — the same accounting for Llama-3-8B and Llama-3-70B shapes with MLP targets at
   full rank, bf16 base weights, fp32 vs bf16 factors, at R = 1, 8, 16, 64 (GiB per rank).
   z and Adam's two moments (and the fp32 gradient) are replicated: they are the "z+opt" column.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3

# Llama-3 shapes (config.json of Meta-Llama-3-8B / -70B): untied embeddings, GQA with 8 KV heads
LLAMA3 = {
    "Llama-3-8B": dict(hidden=4096, mlp=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "Llama-3-70B": dict(hidden=8192, mlp=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
}


def llama_counts(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """Element counts: MLP target weights, their factors at full rank (U, V, S), everything else."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    norms = 2 * hidden
    mlp_w = 3 * hidden * mlp
    k = min(hidden, mlp)
    # gate/up: W (mlp x hidden): U (mlp x k), V (hidden x k); down: W (hidden x mlp): U (hidden x k), V (mlp x k)
    uv = 3 * (mlp + hidden) * k
    s = 3 * k
    other = layers * (attn + norms) + 2 * vocab * hidden + hidden
    return {"target_w": layers * mlp_w, "uv": layers * uv, "s": layers * s, "z": layers * s, "other": other}


def analytic_table(ranks=(1, 8, 16, 64)) -> str:
    lines = ["| model | factors | R | other weights (bf16, replicated) | target W / rank (bf16) | factors / rank "
             "| z+opt (fp32) | total / rank | unsharded rank | factors / W (elements) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, shape in LLAMA3.items():
        c = llama_counts(**shape)
        for fdtype, fbytes in (("fp32", 4), ("bf16", 2)):
            for R in ranks:
                other = c["other"] * 2
                tw = c["target_w"] * 2 / R
                fac = c["uv"] * fbytes / R + c["s"] * 4  # S stays fp32 and replicated
                zopt = c["z"] * 4 * 4  # z, grad, Adam m and v
                total = other + tw + fac + zopt
                unsharded = other + c["target_w"] * 2 + c["uv"] * fbytes + c["s"] * 4 + zopt
                lines.append(f"| {name} | {fdtype} | {R} | {other / GiB:.2f} | {tw / GiB:.2f} | {fac / GiB:.2f} | "
                             f"{zopt / GiB:.4f} | **{total / GiB:.2f}** | {unsharded / GiB:.2f} | "
                             f"{c['uv'] / c['target_w']:.2f} |")
    return "\n".join(lines)


def synthetic_batch(prompts: int, samples: int, vocab: int = 50, seed: int = 0):
    """Random prompts (12-24 tokens) and completions (4-16 tokens) with ±1 rewards: the demo's batch shape."""
    import torch

    from t2dist.rl.rollout import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    p_ids, c_ids = [], []
    for _ in range(prompts):
        prompt = torch.randint(4, vocab, (int(torch.randint(12, 25, (1,), generator=g)),), generator=g).tolist()
        for _ in range(samples):
            p_ids.append(prompt)
            c_ids.append(torch.randint(4, vocab, (int(torch.randint(4, 17, (1,), generator=g)),), generator=g).tolist())
    rewards = torch.randint(0, 2, (prompts, samples), generator=g).float() * 2 - 1
    return RolloutBatch(p_ids, c_ids, rewards, rewards > 0)


def measured(model: str, ranks=(1, 2), prompts: int = 16, samples: int = 8, steps: int = 5) -> str:
    import ray
    import torch
    from safetensors.torch import load_file

    from learner.worker import LearnerWorker
    from t2dist.config import config_from_dict
    from t2dist.svf.factors import FACTORS_FILE

    from learner.group import split_batch
    from t2dist.rl.losses import compute_advantages

    batch = synthetic_batch(prompts, samples)
    tmp = Path(tempfile.mkdtemp(prefix="t2mem"))
    base = {"model": {"path": model}, "svf": {"cache_dir": str(tmp / "factors")},
            "rl": {"prompts_per_step": prompts, "samples_per_prompt": samples}, "learner": {"threads_per_rank": 1}}
    ray.init(num_cpus=max(ranks) + 1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    rows = []
    try:
        Actor = ray.remote(num_cpus=1)(LearnerWorker)
        for R, shard in [(1, False)] + [(r, True) for r in ranks]:
            cfg = config_from_dict({**base, "learner": {**base["learner"], "ranks": R, "shard_factors": shard}})
            workers = [Actor.remote(cfg.model_dump(), r, R) for r in range(R)]
            try:
                addr, port = ray.get(workers[0].endpoint.remote("127.0.0.1"))
                infos = ray.get([w.connect.remote(addr, port) for w in workers], timeout=600)
                secs = []
                for step in range(1 + steps):  # the first one warms up
                    shards = split_batch(batch, R, compute_advantages(batch.rewards, "group_mean"))
                    out = ray.get([w.train_step.remote(b, a, float(batch.num_tokens)) for w, (b, a) in zip(workers, shards)])
                    secs.append(max(o["seconds"] for o in out))
                for info in infos:
                    info["step_s"] = statistics.median(secs[1:])
                ray.get([w.shutdown.remote() for w in workers], timeout=60)
            finally:
                for w in workers:
                    ray.kill(w)
            rows.append((R, shard, infos))
        (cache,) = [p for p in (tmp / "factors").iterdir() if (p / FACTORS_FILE).is_file()]
        total = sum(t.numel() * t.element_size() for t in load_file(str(cache / FACTORS_FILE)).values())
    finally:
        ray.shutdown()
    kb = 1024
    lines = [f"factor cache: {total / kb:,.1f} KiB in total (U, S, V of every target, fp32)", "",
             "| R | sharded | rank | factors (KiB) | factors read (KiB) | factors / (total/R) | target W (KiB) "
             f"| other weights (KiB) | learner step ({prompts}x{samples} seqs, s) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for R, shard, infos in rows:
        for info in infos:
            m = info["memory"]
            lines.append(f"| {R} | {'yes' if shard else 'no'} | {info['rank']} | {m['factor_bytes'] / kb:,.1f} | "
                         f"{m['factor_bytes_read'] / kb:,.1f} | {m['factor_bytes'] / (total / R):.3f} | "
                         f"{m['target_weight_bytes'] / kb:,.1f} | {m['other_weight_bytes'] / kb:,.1f} | "
                         f"{info['step_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--analytic-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.analytic_only:
        print(f"## Measured per-rank bytes, learner ranks on CPU ({args.model})\n")
        print(measured(args.model))
        print()
    print("## Analytic per-rank memory (GiB), MLP targets at full rank, bf16 base weights\n")
    print(analytic_table())
    print("\nfactors / W: U and V hold this many numbers per number of W (full rank); "
          "z+opt = z, its gradient and Adam's two moments, replicated on every rank.")


if __name__ == "__main__":
    main()
