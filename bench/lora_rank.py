"""How low-rank are SVF experts, and what does serving one as a LoRA adapter cost? (issue 27, parts 3 and 4)

**Rank table** (default): for each ``--run CONFIG EXPERT`` (an expert directory, a registry reference, or
``random`` for scales 1 + 0.1·N(0, 1): smoke runs only), greedy test accuracy (95% Wilson interval, the
task's whole test split unless ``--limit``) and the relative Frobenius error
``‖ΔW − B_K A_K‖_F / ‖ΔW‖_F`` over all targets at K = full, 512, 256, 128, 64, 32, 16 (``--ranks``):

    python bench/lora_rank.py --registry t2dist/assets/experts-smollm2 \\
        --run configs/smollm2-arith.yaml arith:champion --run configs/smollm2-sentiment.yaml sentiment:champion
    python bench/lora_rank.py --registry REG --run configs/gemma3-arith.yaml gemma3-arith:champion \\
        --run configs/smollm2-arith.yaml smollm2-arith-r512:champion      # trained with svf.rank=512

``full`` is the expert itself (``SVFModel.merge_``, no cap); a K at or above an expert's full rank is
exact and repeats the ``full`` accuracy without evaluating again; ``base`` is the base model. Accuracy at
rank K is measured by writing ``W + B_K A_K`` (the adapter ``t2dist export --format lora --rank K``
writes, from :func:`t2dist.experts.lora.lora_pairs`) into the HF model's target weights and greedy-decoding
through the project's evaluation (:func:`t2dist.evaluation.accuracy.evaluate`, the trainer's settings:
``task.max_new_tokens``, ``eval.batch_size``). That equals applying the adapter at run time up to float32
round-off (x·(W + BA)ᵀ against x·Wᵀ + (x·Aᵀ)·Bᵀ; tests/test_lora_export.py checks peft's logits to 1e-4)
and is far faster on CPU than vLLM's LoRA path. Factors are float32 (``svf.delta_dtype=float32``
whatever the config says), so the errors are the exact ones of the stored singular vectors.

**Speed table** (``--speed``, one ``--run``): vLLM output tokens/s on the same prompts (the task's first
``--prompts`` test prompts, ``--max-tokens`` new tokens each, greedy, ``ignore_eos``), one engine at a
time, in one run: the base model; the merged expert (``t2dist export``); the base with the expert as a
LoRA adapter at K = 512, 128, 32 (``--speed-ranks``; ``max_lora_rank`` = K, ``max_loras`` 1), for LoRA
requests alone, base requests alone, and half-and-half in one call, with vLLM's stock CPU LoRA ops and
with the grouped ops (t2dist/engines/vllm_lora_ops.py; ``--ops``), and with ``lora_target_modules``
restricted to the modules the adapter has (``--mlp-only``: vLLM otherwise runs zero LoRA products on
every attention projection too). ``--profile S`` samples vLLM's worker with py-spy for S seconds during a
LoRA run of each ops kind and prints where the time goes (self and inclusive shares). Only the ratios
within one run mean anything on a shared machine; the JSON records the load average before and after.

Both write ``--json`` (default ``bench/results/<date>-lora-rank.json`` / ``-lora-speed.json``) with
``rows`` and the machine (CPU model and flags, versions, the base model's fingerprint), and a markdown
table beside it (``.md``). vLLM spawns its engine process, hence the ``__main__`` guard.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2dist.cli.common import policy_overrides_from_card  # noqa: E402
from t2dist.config import load_config  # noqa: E402
from t2dist.evaluation.accuracy import evaluate  # noqa: E402
from t2dist.experts.expert import Expert, check_compatible, make_card  # noqa: E402
from t2dist.experts.lora import lora_pairs  # noqa: E402
from t2dist.policy.load import load_policy  # noqa: E402
from t2dist.tasks import get_task  # noqa: E402

RANKS = ["full", "512", "256", "128", "64", "32", "16"]
SPEED_RANKS = [512, 128, 32]


# -- the machine ---------------------------------------------------------------------------------

def machine() -> dict:
    """CPU model and flags (lscpu), cores, load average, versions."""
    import peft
    import transformers

    info = {"cpu": "?", "flags": "", "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "load_avg_start": _load(), "shared_machine_note": "timings on a shared machine: compare "
            "ratios within this run only"}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            elif key.strip() == "Flags":
                info["flags"] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # not installed or broken: the rank table does not need it
        info["vllm"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load() -> tuple[float, ...]:
    return tuple(round(x, 2) for x in os.getloadavg())


def key_flags(flags: str) -> str:
    have = set(flags.split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in have)


# -- loading an expert with its policy ----------------------------------------------------------------

def load_run(config: str, ref: str, registry: str | None, overrides: list[str]):
    """``(cfg, policy, tokenizer, expert)``: the config with the expert card's policy setup, float32 factors."""
    if ref == "random":
        cfg = load_config(config, [*overrides, "svf.delta_dtype=float32"])
        policy, tok = load_policy(cfg)
        g = torch.Generator().manual_seed(0)
        z = {k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) for k, v in policy.neutral_z().items()}
        card = make_card(policy, name="random", task=cfg.task.name, base_model=cfg.model.path)
        return cfg, policy, tok, Expert(z=z, card=card)
    from t2dist.registry import read_expert_ref

    expert = read_expert_ref(ref, registry)
    card_keys = [f"{k}={v}" for k, v in policy_overrides_from_card(expert.card, overrides).items()]
    cfg = load_config(config, [*card_keys, *overrides, "svf.delta_dtype=float32"])
    policy, tok = load_policy(cfg)
    check_compatible(expert, policy, source=f"expert {ref}")
    return cfg, policy, tok, expert


# -- the rank table ----------------------------------------------------------------------------------

class TargetWeights:
    """Writes ``W + ΔW`` into the policy's target weights, and puts ``W`` back."""

    def __init__(self, policy):
        self.policy = policy
        self.base = {t: policy.model.get_submodule(t).weight.detach().clone() for t in policy.targets}

    @torch.no_grad()
    def set(self, deltas: dict[str, torch.Tensor] | None) -> None:
        for t, w0 in self.base.items():
            w = self.policy.model.get_submodule(t).weight
            w.copy_(w0 if deltas is None else (w0.float() + deltas[t].to(w0.device)).to(w.dtype))


def accuracy_row(cfg, policy, tok, task, limit) -> dict:
    t0 = time.perf_counter()
    res = evaluate(policy.model, tok, task, split="test", limit=limit, batch_size=cfg.eval.batch_size,
                   max_new_tokens=cfg.task.max_new_tokens)
    return {"accuracy": res.accuracy, "ci_low": res.ci_low, "ci_high": res.ci_high, "n_test": res.n,
            "correct": res.correct, "eval_seconds": round(time.perf_counter() - t0, 1)}


def rank_rows(config: str, ref: str, args) -> list[dict]:
    cfg, policy, tok, expert = load_run(config, ref, args.registry, args.set)
    task = get_task(expert.card.get("task") or cfg.task.name)
    weights = TargetWeights(policy)
    common = {"model": cfg.model.path, "task": task.name, "expert": ref, "config": config,
              "targets": len(policy.targets), "fingerprint": policy.fingerprint}
    rows, full = [], None
    for spec in (["base"] if args.base else []) + list(args.ranks):
        if spec == "base":
            weights.set(None)
            row = {"rank": "base", "k": 0, "frobenius_error": 1.0, "worst_target_error": 1.0, "exact": False}
        elif spec == "full":
            weights.set({t: policy.delta(t, expert.z) for t in policy.targets})
            row = {"rank": "full", "k": max(policy.factors[t].rank for t in policy.targets),
                   "frobenius_error": 0.0, "worst_target_error": 0.0, "exact": True}
        else:
            pairs, report = lora_pairs(policy, expert.z, int(spec))
            row = {"rank": int(spec), "k": report.rank, "frobenius_error": report.overall_error,
                   "worst_target_error": report.worst_error, "exact": report.exact}
            if report.exact and full is not None:
                rows.append({**common, **row, **{k: full[k] for k in ACC_KEYS}, "same_as": "full"})
                print(_row_line(rows[-1]), flush=True)
                continue
            weights.set({t: B @ A for t, (B, A) in pairs.items()})
        row = {**common, **row, **accuracy_row(cfg, policy, tok, task, args.limit)}
        full = row if spec == "full" else full
        rows.append(row)
        print(_row_line(row), flush=True)
    weights.set(None)
    return rows


ACC_KEYS = ("accuracy", "ci_low", "ci_high", "n_test", "correct")


def _row_line(r: dict) -> str:
    return (f"  {r['expert']} rank {r['rank']}: error {r['frobenius_error']:.4f}, accuracy {r['accuracy']:.3f} "
            f"[{r['ci_low']:.3f}-{r['ci_high']:.3f}] (n={r['n_test']})")


def render_ranks(rows: list[dict], info: dict, argv: list[str]) -> str:
    out = [f"# SVF experts as LoRA adapters: accuracy and Frobenius error by rank ({_dt.date.today()})", "",
           f"Command: `python bench/lora_rank.py {' '.join(argv)}`", "",
           f"CPU: {info['cpu']} ({info['cores']} cores; {key_flags(info['flags'])}); torch {info['torch']}, "
           f"peft {info['peft']}. Accuracy at rank K: W + B_K A_K merged into the HF model, greedy.", ""]
    by_expert: dict[tuple, list[dict]] = {}
    for r in rows:
        by_expert.setdefault((r["model"], r["task"], r["expert"]), []).append(r)
    for (model, task, expert), rs in by_expert.items():
        out += [f"## {model} / {task} / `{expert}` ({rs[0]['targets']} targets, base fingerprint "
                f"{rs[0]['fingerprint']})", "", "| rank | K | rel. Frobenius error (worst target) | accuracy [95% CI] | n |",
                "|---|---|---|---|---|"]
        for r in rs:
            same = " (exact: = full)" if r.get("same_as") else ""
            out.append(f"| {r['rank']} | {r['k']} | {r['frobenius_error']:.4f} ({r['worst_target_error']:.4f}) | "
                       f"{100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}]{same} | "
                       f"{r['n_test']} |")
        out.append("")
    return "\n".join(out)


# -- the speed table ------------------------------------------------------------------------------------

def export_all(cfg, policy, tok, expert, ranks: list[int], work: Path) -> tuple[Path, dict[int, tuple[Path, dict]]]:
    """The merged checkpoint and one adapter per distinct effective K."""
    from t2dist.experts.export import export_merged
    from t2dist.experts.lora import export_lora

    merged = export_merged(policy, tok, expert.z, expert.card, work / "merged")
    adapters: dict[int, tuple[Path, dict]] = {}
    for k in ranks:
        _, report = lora_pairs(policy, expert.z, k)
        if report.rank not in adapters:
            path, report = export_lora(policy, tok, expert.z, expert.card, work / f"lora-{report.rank}", k)
            adapters[report.rank] = (path, report.to_dict())
    return merged, adapters


def engine_kwargs(cfg, model_dir, **extra) -> dict:
    vc = cfg.rollout.vllm
    on_gpu = torch.cuda.is_available() and cfg.model.device != "cpu"
    kw = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=cfg.model.dtype, enforce_eager=vc.enforce_eager,
              enable_prefix_caching=False, seed=0)
    if vc.max_model_len:
        kw["max_model_len"] = vc.max_model_len
    if on_gpu:
        kw["gpu_memory_utilization"] = vc.gpu_memory_utilization
    kw.update(extra)
    return kw


def worker_pid() -> int | None:
    """vLLM's model-running process under this one (``VLLM::Worker``, else the engine core)."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    for tag in ("Worker", "EngineCore"):
        for p in procs:
            try:
                if tag in " ".join([p.name(), *p.cmdline()]):
                    return p.pid
            except psutil.Error:
                continue
    return None


def profile_run(llm, requests, params, lora, seconds: float, out: Path) -> dict:
    """py-spy the worker while LoRA requests run: shares of samples by function (self and inclusive)."""
    import shutil

    pid = worker_pid()
    if pid is None:
        return {"error": "no vLLM worker process found"}
    if shutil.which("py-spy") is None:
        return {"error": "py-spy is not installed (pip install -e '.[bench]')"}
    raw = out.with_suffix(".txt")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
                            "--format", "raw", "--nonblocking", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + seconds
    while time.time() < deadline and spy.poll() is None:
        llm.generate(requests, params, lora_request=lora, use_tqdm=False)
    err = spy.communicate(timeout=seconds + 60)[1]
    if not raw.is_file():
        return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    return summarize_stacks(raw.read_text())


def summarize_stacks(text: str, top: int = 12) -> dict:
    """Self and inclusive sample shares from py-spy's raw (collapsed) stacks, plus named groups."""
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    groups = {  # exclusive, in this order: a stack counts for the first that matches
        "LoRA ops, grouped (t2dist per_adapter)": lambda st: "vllm_lora_ops.py" in st,
        "LoRA ops, stock (vLLM torch_ops: per-token weight gather + einsum)": lambda st: "lora/ops/torch_ops" in st,
        "rest of vLLM's LoRA layers": lambda st: "vllm/lora/" in st,
        "rest of the model forward": lambda st: "execute_model" in st,
    }
    group_n = dict.fromkeys(groups, 0)
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n, frames = int(n), stack.split(";")
        total += n
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        hit = next((g for g, match in groups.items() if match(stack)), None)
        if hit is not None:
            group_n[hit] += n
    share = (lambda c: round(c / total, 4)) if total else (lambda c: 0.0)
    return {"samples": total, "groups": {g: share(c) for g, c in group_n.items()},
            "top_self": [(f, share(c)) for f, c in sorted(selfs.items(), key=lambda x: -x[1])[:top]],
            "top_inclusive": [(f, share(c)) for f, c in sorted(incl.items(), key=lambda x: -x[1])[:top]]}


def measure(llm, requests, params, lora_requests, repeat: int) -> dict:
    """Output tokens/s of one ``generate`` call (best of ``repeat``, after a short warm-up)."""
    llm.generate(requests[:2], params, lora_request=lora_requests[:2] if lora_requests else None, use_tqdm=False)
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = llm.generate(requests, params, lora_request=lora_requests, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if best is None or tokens / dt > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 2)}
    return best


def run_engine(kw: dict, requests, params, adapter: Path | None, args, label: str, work: Path) -> list[dict]:
    """Start one engine, measure base / LoRA / mixed requests as it allows, shut it down."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    llm = LLM(**kw)
    start = round(time.perf_counter() - t0, 1)
    rows = []
    try:
        n = len(requests)
        if adapter is None:
            rows.append({"engine": label, "requests": "base", "start_s": start, **measure(llm, requests, params, None, args.repeat)})
            return rows
        lr = LoRARequest("expert", 1, str(adapter))
        for what, lrs in (("lora", [lr] * n), ("base", None), ("mixed", [lr if i % 2 else None for i in range(n)])):
            rows.append({"engine": label, "requests": what, "start_s": start,
                         **measure(llm, requests, params, lrs, args.repeat)})
        if args.profile:
            rows[0]["profile"] = profile_run(llm, requests, params, [lr] * n, args.profile, work / f"spy-{label}")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return rows


def engine_plan(cfg, base_dir: str, merged: Path, adapters: dict, args) -> list[tuple[str, dict, Path | None]]:
    from t2dist.engines.vllm_lora_ops import WORKER_EXTENSION

    plan = [("base", engine_kwargs(cfg, base_dir), None), ("merged", engine_kwargs(cfg, merged), None)]
    for ops in args.ops:
        for k, (path, report) in sorted(adapters.items(), reverse=True):
            extra = {"enable_lora": True, "max_lora_rank": report["vllm_max_lora_rank"], "max_loras": 1}
            if ops == "grouped":
                extra["worker_extension_cls"] = WORKER_EXTENSION
            plan.append((f"lora K={k} {ops} ops", engine_kwargs(cfg, base_dir, **extra), path))
            if args.mlp_only:
                extra = {**extra, "lora_target_modules": ["gate_up_proj", "down_proj"]}
                plan.append((f"lora K={k} {ops} ops, MLP-only", engine_kwargs(cfg, base_dir, **extra), path))
    return plan


def speed_rows(config: str, ref: str, args, work: Path) -> tuple[list[dict], dict]:
    from vllm import SamplingParams

    from t2dist.engines.generation import encode_prompts
    from t2dist.models.loading import resolve_model_path

    cfg, policy, tok, expert = load_run(config, ref, args.registry, args.set)
    task = get_task(expert.card.get("task") or cfg.task.name)
    merged, adapters = export_all(cfg, policy, tok, expert, args.speed_ranks, work)
    meta = {"model": cfg.model.path, "task": task.name, "expert": ref, "fingerprint": policy.fingerprint,
            "adapters": {k: r for k, (_, r) in adapters.items()}, "prompts": args.prompts, "max_tokens": args.max_tokens}
    requests = [{"prompt_token_ids": ids} for ids in
                encode_prompts(tok, [task.prompt_for(e, tok) for e in task.examples("test")[: args.prompts]])]
    del policy
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # the policy's GPU memory goes back before vLLM sizes its cache
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    base_dir = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    if not torch.cuda.is_available():  # read by the engine process vLLM spawns
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    rows = []
    for label, kw, adapter in engine_plan(cfg, base_dir, merged, adapters, args):
        print(f"  engine: {label}", flush=True)
        for r in run_engine(kw, requests, params, adapter, args, label, work):
            rows.append({**r, "model": cfg.model.path})
            print(f"    {r['requests']}: {r['tokens_per_s']} tokens/s", flush=True)
    base = next(r["tokens_per_s"] for r in rows if r["engine"] == "base")
    for r in rows:
        r["vs_base"] = round(r["tokens_per_s"] / base, 3)
    return rows, meta


def render_speed(rows: list[dict], meta: dict, info: dict, argv: list[str]) -> str:
    out = [f"# vLLM output tokens/s: base, merged expert, expert as LoRA ({_dt.date.today()})", "",
           f"Command: `python bench/lora_rank.py {' '.join(argv)}`", "",
           f"Machine: {info.get('gpu') or info['cpu']} ({info['cores']} cores; {key_flags(info['flags'])}); "
           f"vllm {info.get('vllm')}, torch {info['torch']}. Load average {info['load_avg_start']} at the start, "
           f"{info.get('load_avg_end')} at the end: {info['shared_machine_note']}.", "",
           f"{meta['model']} / {meta['task']} / `{meta['expert']}`: {meta['prompts']} prompts × {meta['max_tokens']} "
           "new tokens, greedy, ignore_eos; one engine at a time.", "",
           "| engine | requests | output tokens/s | × base | start s |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['engine']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['vs_base']:.2f} | {r['start_s']} |")
    for r in rows:
        if r.get("profile") and "groups" in r["profile"]:
            p = r["profile"]
            out += ["", f"Where the time goes, {r['engine']} (py-spy, {p['samples']} samples of the worker):", ""]
            out += [f"- {g}: {100 * s:.1f}%" for g, s in p["groups"].items()]
            out += [f"- self: {f} {100 * s:.1f}%" for f, s in p["top_self"][:6]]
    return "\n".join(out) + "\n"


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs=2, action="append", metavar=("CONFIG", "EXPERT"), required=True,
                   help="a run config and an expert (directory, NAME[@VERSION|:ALIAS] in --registry, or random)")
    p.add_argument("--registry", help="registry URL for expert references")
    p.add_argument("--ranks", nargs="+", default=RANKS, help="ranks of the table (full = the expert itself)")
    p.add_argument("--limit", type=int, help="first N test examples only (smoke runs; default: the whole split)")
    p.add_argument("--no-base", dest="base", action="store_false", help="leave out the base model's row")
    p.add_argument("--set", nargs="*", default=[], metavar="key.sub=value", help="config overrides for every run")
    p.add_argument("--json", type=Path, help="result file (default bench/results/<date>-lora-{rank,speed}.json)")
    p.add_argument("--speed", action="store_true", help="the vLLM speed table instead (one --run)")
    p.add_argument("--speed-ranks", nargs="+", type=int, default=SPEED_RANKS)
    p.add_argument("--ops", nargs="+", choices=["stock", "grouped"], default=["stock", "grouped"],
                   help="vLLM's CPU LoRA ops (stock) and/or t2dist/engines/vllm_lora_ops.py (grouped)")
    p.add_argument("--mlp-only", action="store_true", help="also run each LoRA engine with lora_target_modules "
                   "restricted to gate_up_proj/down_proj")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="timed generate calls per measurement (the best counts)")
    p.add_argument("--profile", type=float, default=0.0, metavar="S", help="py-spy each LoRA engine for S seconds")
    args = p.parse_args(argv)
    if args.speed and len(args.run) != 1:
        p.error("--speed takes one --run")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    info = machine()
    kind = "speed" if args.speed else "rank"
    path = args.json or ROOT / "bench" / "results" / f"{_dt.date.today()}-lora-{kind}.json"
    if args.speed:
        with tempfile.TemporaryDirectory(prefix="t2dist-lora-speed-") as work:
            rows, meta = speed_rows(*args.run[0], args, Path(work))
    else:
        rows, meta = [r for config, ref in args.run for r in rank_rows(config, ref, args)], {}
    info["load_avg_end"] = _load()
    text = render_speed(rows, meta, info, argv) if args.speed else render_ranks(rows, info, argv)
    from t2dist.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(path, {"command": ["python", "bench/lora_rank.py", *argv], "machine": info, **meta, "rows": rows})
    atomic_write_text(path.with_suffix(".md"), text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
