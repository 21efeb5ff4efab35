"""``t2dist serve`` under load: throughput, latency, switches, the first pass's share, accuracy through the server.

    python bench/serve.py --json FILE [--model smollm2] [--registry DIR] [--task mixed_real] [--n 96]
                          [--concurrency 8] [--modes exact[,lora]] [--engine auto|hf|vllm] [key=value ...]

Starts the real server (``t2dist serve`` as a subprocess: Ray Serve, one engine replica, one dispatch
replica) and sends the task's test prompts (``mixed_real``: arith, ARC-Easy and sentiment interleaved; each
written and generated as its task does) through the ``openai`` client at a fixed concurrency, greedy, in
one run per mode (``serve.mode``) and strategy:

(a) ``base`` — every prompt to the base;
(b) ``one_expert`` — every prompt to one named expert (the first of auto's routes: ``arith`` on SmolLM2);
(c) ``experts`` — each prompt to the expert of its own category (the ``named`` reference for auto), so
    the experts interleave as they arrive; a category without an expert goes to the base;
(d) ``auto_prompt`` and ``auto_cls`` — ``model=auto`` with ``serve.strategy`` prompt and cls (two server
    starts: the strategy is the server's).

Per run: requests/s, output tokens/s, p50/p95 latency, expert switches (from /metrics), accuracy (the
task's verifier on the answers) and, for auto, dispatch accuracy and ``dispatch_share`` (the first pass's
seconds over the requests' seconds, both as the client and the server see them).  Keys of the issue:
``base_tokens_per_s``, ``mixed_experts_vs_base`` (c/a tokens/s, goal >= 0.7), ``auto_vs_named`` (d/c, goal
>= 0.6), ``dispatch_share`` (goal <= 0.25), ``switches_per_request`` (c), ``auto_accuracy`` (the offline
two-pass: 64.2% prompt / 64.5% cls on mixed_real n=600; through the server within 1 point).  A goal that
is missed says by how much.  Writes FILE and a markdown table beside it.  Timings on a shared machine
are not results: compare the ratios of one run (the script records the CPU and the load average).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"mixed_experts_vs_base": (">=", 0.7), "auto_vs_named": (">=", 0.6), "dispatch_share": ("<=", 0.25)}
OFFLINE_ACCURACY = {"prompt": 0.642, "cls": 0.645}  # the offline two-pass on mixed_real, n=600 (issue 26)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="results file (a .md table is written beside it)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--registry", help="registry.url (default: the experts shipped for SmolLM2)")
    p.add_argument("--task", default="mixed_real", help="mixed_real (SmolLM2) or mixed (the toy)")
    p.add_argument("--n", type=int, default=96, help="test prompts per run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--modes", default="exact", help="serve.mode values to run: exact, lora")
    p.add_argument("--engine", default="auto", help="serve.engine")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="more t2dist serve overrides (key=value)")
    return p.parse_args(argv)


def machine() -> dict:
    cpu, flags = platform.processor(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1)
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info)
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}


class Workload:
    """The task's prompts as the client sends them, and how to score the answers."""

    def __init__(self, task_name: str, n: int, model: str):
        from t2dist.config import load_config
        from t2dist.serve.plan import load_tokenizer
        from t2dist.tasks import get_task

        self.task = get_task(task_name)
        self.examples = self.task.examples("test")[:n]
        self.tokenizer = load_tokenizer(load_config(None, [f"model.path={model}"]).model)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) and self.task.chat != "never"

    def request(self, e, model: str) -> dict:
        from t2dist.tasks import get_task

        max_new, stop = self.task.generation_for(e)
        kw = {"model": model, "max_tokens": max_new, "temperature": 0, "stop": list(stop) or None}
        src = get_task(e.task) if e.task else self.task
        if self.chat:
            kw["messages"] = [{"role": "user", "content": src.format_prompt(e)}]
        else:
            kw["prompt"] = src.prompt_for(e, self.tokenizer)
        return kw

    def score(self, texts: list[str]) -> float:
        verdicts = self.task.verify_batch(texts, list(self.examples))
        return sum(v.correct for v in verdicts) / max(1, len(verdicts))


async def _send(client, kw: dict) -> dict:
    t0 = time.perf_counter()
    if "messages" in kw:
        r = await client.chat.completions.create(**kw)
        text = r.choices[0].message.content
    else:
        r = await client.completions.create(**kw)
        text = r.choices[0].text
    return {"text": text, "seconds": time.perf_counter() - t0, "tokens": r.usage.completion_tokens,
            "t2dist": r.model_extra.get("t2dist", {})}


async def _run(url: str, requests: list[dict], concurrency: int) -> tuple[list[dict], float]:
    import openai

    sem = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("T2DIST_API_KEY", "x"),
                                  max_retries=0, timeout=1800) as client:
        async def one(kw):
            async with sem:
                return await _send(client, kw)

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(kw) for kw in requests))
        return list(out), time.perf_counter() - t0


def switches(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(float(v) for v in re.findall(r'^t2dist_expert_switches_total\{[^}]*role="experts"[^}]*\} (\S+)', text,
                                            re.M))


def measure(url: str, w: Workload, models: list[str], concurrency: int, routes: dict) -> dict:
    """One run: every prompt to its model, at the fixed concurrency."""
    from t2dist.adapt.strategies import gold_category

    s0 = switches(url)
    got, seconds = asyncio.run(_run(url, [w.request(e, m) for e, m in zip(w.examples, models)], concurrency))
    n_switch = switches(url) - s0
    lat = sorted(g["seconds"] for g in got)
    tokens = sum(g["tokens"] for g in got)
    out = {"requests": len(got), "seconds": seconds, "requests_per_s": len(got) / seconds,
           "output_tokens_per_s": tokens / seconds, "p50_s": statistics.median(lat),
           "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "switches": n_switch,
           "switches_per_request": n_switch / len(got), "accuracy": w.score([g["text"] for g in got])}
    if models[0] == "auto":
        labels = [g["t2dist"].get("dispatch") for g in got]
        gold = [gold_category(e, [*routes, "other"]) for e in w.examples]
        out["dispatch_accuracy"] = sum(a == b for a, b in zip(labels, gold)) / len(got)
        out["dispatch_share"] = sum(g["t2dist"].get("dispatch_s", 0.0) for g in got) / sum(g["seconds"] for g in got)
        out["labels"] = {lab: labels.count(lab) for lab in sorted(set(map(str, labels)))}
    return out


def routes_of(url: str) -> dict:
    import httpx

    data = httpx.get(url + "/v1/models", timeout=60,
                     headers={"authorization": f"Bearer {os.environ.get('T2DIST_API_KEY', 'x')}"}).json()["data"]
    return next(m["t2dist"]["routes"] for m in data if m["id"] == "auto")


class Server:
    """``t2dist serve`` in a subprocess (stopped with Ctrl-C)."""

    def __init__(self, args, strategy: str, mode: str, log: Path):
        from t2dist.serve.local import free_port
        from t2dist.serve.process import ServerProcess

        port = args.port or free_port()
        over = [f"serve.strategy={strategy}", f"serve.mode={mode}", f"serve.engine={args.engine}", "serve.replicas=1",
                "serve.dispatch_replicas=1", *args.overrides]
        cli = ["--model", args.model, *(["--registry", args.registry] if args.registry else []), *over]
        self.proc = ServerProcess(cli, port, log)

    def __enter__(self):
        self.proc.wait_ready(timeout=1800)
        return self.proc.url

    def __exit__(self, *exc):
        self.proc.stop()


def run_mode(args, w: Workload, mode: str, out_dir: Path) -> dict:
    from t2dist.adapt.strategies import gold_category

    runs = {}
    with Server(args, "prompt", mode, out_dir / f"serve-{mode}-prompt.log") as url:
        routes = routes_of(url)
        named = [routes.get(gold_category(e, [*routes, "other"]), "base") for e in w.examples]
        one = next(iter(routes.values()), "base")
        for name, models in (("base", ["base"] * len(w.examples)), ("one_expert", [one] * len(w.examples)),
                             ("experts", named), ("auto_prompt", ["auto"] * len(w.examples))):
            runs[name] = measure(url, w, models, args.concurrency, routes)
            print(f"[{mode}] {name}: {json.dumps(_short(runs[name]))}", flush=True)
    with Server(args, "cls", mode, out_dir / f"serve-{mode}-cls.log") as url:
        runs["auto_cls"] = measure(url, w, ["auto"] * len(w.examples), args.concurrency, routes_of(url))
        print(f"[{mode}] auto_cls: {json.dumps(_short(runs['auto_cls']))}", flush=True)
    runs["one_expert_name"] = one
    return runs


def _short(r: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "labels"}


def summary(runs: dict) -> dict:
    base, mixed = runs["base"]["output_tokens_per_s"], runs["experts"]["output_tokens_per_s"]
    s = {"base_tokens_per_s": base, "mixed_experts_vs_base": mixed / base,
         "auto_vs_named": {k: runs[f"auto_{k}"]["output_tokens_per_s"] / mixed for k in ("prompt", "cls")},
         "dispatch_share": {k: runs[f"auto_{k}"]["dispatch_share"] for k in ("prompt", "cls")},
         "switches_per_request": runs["experts"]["switches_per_request"],
         "auto_accuracy": {k: runs[f"auto_{k}"]["accuracy"] for k in ("prompt", "cls")},
         "dispatch_accuracy": {k: runs[f"auto_{k}"]["dispatch_accuracy"] for k in ("prompt", "cls")}}
    s["goals"] = goals(s)
    return s


def goals(s: dict) -> dict:
    out = {}
    for key, (op, target) in GOALS.items():
        vals = s[key] if isinstance(s[key], dict) else {"": s[key]}
        for k, v in vals.items():
            met = v >= target if op == ">=" else v <= target
            out[f"{key}{'.' + k if k else ''}"] = {"value": v, "goal": f"{op} {target}", "met": met,
                                                    "missed_by": 0.0 if met else abs(v - target)}
    return out


def markdown(result: dict) -> str:
    lines = [f"# t2dist serve bench ({result['model']}, {result['task']}, n={result['n']}, concurrency "
             f"{result['concurrency']})", "", f"Machine: {result['machine']}", ""]
    for mode, runs in result["modes"].items():
        lines += [f"## mode {mode}", "", "| run | req/s | out tok/s | p50 s | p95 s | switches/req | accuracy | "
                  "dispatch acc | dispatch share |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in runs["runs"].items():
            if not isinstance(r, dict):
                continue
            lines.append(f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
                         f"{r['p95_s']:.2f} | {r['switches_per_request']:.2f} | {r['accuracy']:.3f} | "
                         f"{r.get('dispatch_accuracy', float('nan')):.3f} | {r.get('dispatch_share', float('nan')):.3f} |")
        lines += ["", "```json", json.dumps({k: v for k, v in runs["summary"].items()}, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = Workload(args.task, args.n, args.model)
    result = {"model": args.model, "task": args.task, "n": len(w.examples), "concurrency": args.concurrency,
              "engine": args.engine, "machine": machine(), "offline_two_pass_accuracy": OFFLINE_ACCURACY, "modes": {}}
    for mode in [m for m in args.modes.split(",") if m]:
        runs = run_mode(args, w, mode, out.parent)
        result["modes"][mode] = {"runs": runs, "summary": summary(runs)}
        result.update(result["modes"][mode]["summary"] if mode == "exact" or len(result["modes"]) == 1 else {})
    result["machine"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
