"""``serve.engine: auto``: which engine serves faster *here*, decided by a short measurement, once.

Which engine wins depends on the CPU, not on a rule one could write down: on SmolLM2 (8 prompts x
8 samples, 2 cores) the HF shared-prefix sampler gave 3.1 samples/s and vLLM 6.1 on an AVX512
Intel, but 15.2 against 4.8 on an AVX2-only AMD EPYC; a z switch costs 0.2 s in vLLM's worker on
the first and 0.9 s on the second (issue 26).  So ``auto`` measures both engines on a fixed small
serving workload of this very model: 8 short prompts, greedy, 16 new tokens, answered with the base,
then with an expert-like z (one switch), then with the base again (a second switch), after one
warm-up call; the score is generated tokens per second over those three calls (switches included;
vLLM's start-up excluded, it is paid once).  The faster engine serves; the numbers and the reason
are logged, and the decision is cached in ``$T2DIST_CACHE/serve-engine.json`` (default
``~/.cache/t2dist``) under the device (CPU model, or GPU name when replicas take GPUs), the base's
fingerprint, the vLLM and torch versions and the thread count, so the next start skips the
measurement (about a minute, mostly vLLM's start-up).  Decided without measuring: ``hf`` when vLLM
is not importable, the policy is not SVF, or the base has no local directory; ``vllm`` for
``serve.mode: lora``.  The measurement runs where ``t2dist serve`` runs; on a cluster whose nodes
differ, set ``serve.engine`` explicitly.  Measure on a quiet machine: on a loaded one (load average 8-13
on 2 cores) the HF engine with 2 torch threads ran the toy's workload 15-30x slower than with 1 thread
(threads spinning at barriers while the other core is taken), which decides nothing about a quiet
machine; delete the cache file to measure again.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from t2dist.atomic import atomic_write_text
from t2dist.engines import make_engine
from t2dist.engines.vllm import vllm_available
from t2dist.serve.plan import ServePlan

PROMPTS = ("Q: What is 17 + 25?\nA:", "Q: What is 6 * 7?\nA:", "The capital of France is",
           "Write one word that rhymes with cat:", "Q: What is 120 - 45?\nA:", "List three colours:",
           "Review: The soup was cold. Is this review positive or negative?", "Q: What is 9 * 9?\nA:")
NEW_TOKENS = 16


def cache_file() -> Path:
    return Path(os.environ.get("T2DIST_CACHE") or "~/.cache/t2dist").expanduser() / "serve-engine.json"


def device_name(gpus: float) -> str:
    if gpus > 0:
        if torch.cuda.is_available():
            return "gpu:" + torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu:" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu:" + (platform.processor() or platform.machine())


def cache_key(plan: ServePlan, vllm_version: str) -> str:
    s = plan.serve
    threads = s.threads_per_replica or torch.get_num_threads()
    return "|".join([device_name(s.gpus_per_replica), plan.fingerprint, f"vllm {vllm_version}",
                     f"torch {torch.__version__}", f"threads {threads}"])


def fixed_rule(plan: ServePlan) -> tuple[str, str] | None:
    """A decision that needs no measurement, or None."""
    s = plan.serve
    if s.engine != "auto":
        return s.engine, f"serve.engine={s.engine}"
    if s.mode == "lora":
        return "vllm", "serve.mode=lora runs on vLLM's multi-LoRA path"
    ok, why = vllm_available()
    if not ok:
        return "hf", f"vLLM is not usable here ({why})"
    cfg = plan.cfg
    if cfg.policy.kind != "svf":
        return "hf", f"policy.kind={cfg.policy.kind}: vLLM serves SVF experts only"
    return None


def measure_engine(plan: ServePlan, name: str) -> dict:
    """Tokens/s of engine ``name`` on the fixed workload (module docstring)."""
    cfg = plan.cfg
    threads = torch.get_num_threads()
    if plan.serve.threads_per_replica:  # as a replica will run it
        torch.set_num_threads(plan.serve.threads_per_replica)
    t0 = time.perf_counter()
    engine = make_engine(cfg, name, batch_size=len(PROMPTS))
    start_s = time.perf_counter() - t0
    try:
        gen = dict(temperature=0.0, max_new_tokens=NEW_TOKENS, stop=())
        engine.generate(list(PROMPTS), **gen)  # warm-up
        g = torch.Generator().manual_seed(0)
        z = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)
             for k, v in engine.policy.neutral_z().items()}
        tokens, t1 = 0, time.perf_counter()
        for step in ("base", "expert", "base"):
            if step == "expert":
                engine.set_z(z, "measure")
            else:
                engine.unset_z()
            tokens += sum(len(c.completion_ids) for c in engine.generate(list(PROMPTS), **gen))
        seconds = time.perf_counter() - t1
    finally:
        engine.close()
        torch.set_num_threads(threads)
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "start_s": start_s}


def choose_engine(plan: ServePlan, say: Callable[[str], None] = print,
                  measure: Callable[[ServePlan, str], dict] = measure_engine) -> tuple[str, str]:
    """``(engine name, why)`` for ``serve.engine`` (module docstring)."""
    fixed = fixed_rule(plan)
    if fixed is not None:
        return fixed

    key = cache_key(plan, vllm_available()[1])
    path = cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        d = known[key]
        return d["engine"], f"measured {d['when']}: {d['why']} (cached in {path})"
    say("serve.engine=auto: measuring the HF and vLLM engines on a short workload of this model (once per "
        "machine, model and vLLM version)")
    got = {name: measure(plan, name) for name in ("hf", "vllm")}
    best = max(got, key=lambda n: got[n]["tokens_per_s"])
    other = "vllm" if best == "hf" else "hf"
    why = (f"{best} {got[best]['tokens_per_s']:.1f} vs {other} {got[other]['tokens_per_s']:.1f} tokens/s on "
           f"{len(PROMPTS)} prompts x {NEW_TOKENS} tokens with 2 expert switches ({key.split('|')[0]})")
    known[key] = {"engine": best, "why": why, "when": _dt.date.today().isoformat(), "measured": got}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(known, indent=2))
    return best, why
