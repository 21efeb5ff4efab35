"""The server's first pass against ``t2dist adapt``'s: same labels? how much cheaper?

    python bench/serve_dispatch.py --json FILE [--model smollm2] [--registry DIR] [--n 150] [--cut 64]
                                   [--strategies prompt,cls]

``t2dist serve`` asks the first pass's question (``adapt.dispatch_task``: ``dispatch_real`` for SmolLM2) on
the first ``serve.dispatch_prompt_tokens`` tokens of the user's text and stops generating as soon as
the label is decided (t2dist/serve/dispatch.py).  This runs, in one process on the HF engine and on the
same ``mixed_real`` test prompts, the first pass as ``t2dist adapt`` runs it (whole prompt, all of the
task's new tokens) and as the server runs it (``--cut`` tokens, early stop), and the second pass with
the base (each prompt's own new tokens), and reports per strategy: dispatch accuracy of both (the
offline two-pass measured 92.5% prompt / 100% cls on mixed_real n=600), how many labels differ, the
first pass's seconds, new tokens and prompt tokens in both ways, and ``first_vs_second``: the first
pass's seconds over the second pass's (the offline two-pass: 124-128%).  ``cls`` needs the classifier
expert (``serve.cls_expert``) in ``--registry``.  Compare within one run (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def first_pass(engine, texts, spec, cats, served: bool, batch: int = 64) -> dict:
    """``served``: as the server runs it (generate_requests: label stop, shared prefix prefilled once);
    else as ``t2dist adapt`` does (``engine.generate``, all the task's new tokens)."""
    from t2dist.adapt.dispatch import parse_label
    from t2dist.engines.requests import GenRequest
    from t2dist.serve.dispatch import label_decided, question

    tok = engine.tokenizer
    ids = [tok(question(t, tok, spec), add_special_tokens=True)["input_ids"] for t in texts]
    t0, comps = time.perf_counter(), []
    for i in range(0, len(ids), batch):
        if served:
            reqs = [GenRequest(x, max_new_tokens=spec.max_new_tokens, stop=("\n",), stop_when=label_decided(cats))
                    for x in ids[i:i + batch]]
            comps += [c[0] for c in engine.generate_requests(reqs)]
        else:
            comps += engine.generate(ids[i:i + batch], temperature=0.0, max_new_tokens=spec.max_new_tokens,
                                     stop=("\n",))
    return {"labels": [parse_label(c.text, list(cats)) for c in comps], "seconds": time.perf_counter() - t0,
            "new_tokens": sum(len(c.completion_ids) for c in comps), "prompt_tokens": sum(map(len, ids))}


def second_pass(engine, task, exs, served: bool, batch: int = 64) -> float:
    """Seconds of the answers with the base (each prompt's own new tokens), served or as adapt generates."""
    from t2dist.engines.requests import GenRequest

    tok = engine.tokenizer
    reqs = []
    for e in exs:
        max_new, stop = task.generation_for(e)
        reqs.append(GenRequest(tok(task.prompt_for(e, tok), add_special_tokens=True)["input_ids"],
                               max_new_tokens=max_new, stop=stop))
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        if served:
            engine.generate_requests(chunk)
        else:
            for (max_new, stop), idx in _by_setting(chunk).items():
                engine.generate([chunk[j].prompt_ids for j in idx], temperature=0.0, max_new_tokens=max_new, stop=stop)
    return time.perf_counter() - t0


def _by_setting(reqs) -> dict:
    out: dict = {}
    for j, r in enumerate(reqs):
        out.setdefault((r.max_new_tokens, r.stop), []).append(j)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--registry")
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--cut", type=int, default=64)
    p.add_argument("--strategies", default="prompt,cls")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataclasses import replace

    from t2dist.adapt.strategies import gold_category
    from t2dist.config import load_config
    from t2dist.engines import make_engine
    from t2dist.serve.plan import make_plan
    from t2dist.tasks import get_task

    dtask = "dispatch_real" if args.model == "smollm2" else "dispatch"
    over = [f"model.path={args.model}", f"adapt.dispatch_task={dtask}", *([f"registry.url={args.registry}"]
                                                                          if args.registry else [])]
    plan = make_plan(load_config(None, over), lambda m: print(m, file=sys.stderr))
    cats = get_task(dtask).categories  # the dispatch task's (as the offline two-pass), whichever experts are served
    task = get_task("mixed_real" if args.model == "smollm2" else "mixed")
    exs = task.examples("test")[:args.n]
    texts = [task.format_prompt(e) for e in exs]
    gold = [gold_category(e, list(cats)) for e in exs]
    engine = make_engine(plan.cfg, "hf", batch_size=64)
    out = {"model": args.model, "n": len(exs), "cut": args.cut, "categories": list(cats), "strategies": {}}
    out["second_pass_s"] = {"adapt": second_pass(engine, task, exs, served=False),
                            "serve": second_pass(engine, task, exs, served=True)}
    for strategy in [s for s in args.strategies.split(",") if s]:
        if strategy == "cls":
            if not plan.registry_url:
                continue
            from t2dist.registry import Registry

            engine.set_z(Registry(plan.registry_url).load(plan.serve.cls_expert).z, "cls")
        else:
            engine.unset_z()
        offline = first_pass(engine, texts, replace(plan.dispatch, prompt_tokens=None), cats, served=False)
        served = first_pass(engine, texts, replace(plan.dispatch, prompt_tokens=args.cut), cats, served=True)
        row = {}
        for name, r in (("adapt", offline), ("serve", served)):
            row[name] = {"dispatch_accuracy": sum(a == b for a, b in zip(r["labels"], gold)) / len(gold),
                         "seconds": r["seconds"], "new_tokens": r["new_tokens"], "prompt_tokens": r["prompt_tokens"],
                         "first_vs_second": r["seconds"] / out["second_pass_s"][name]}
        row["labels_differ"] = sum(a != b for a, b in zip(offline["labels"], served["labels"]))
        out["strategies"][strategy] = row
        print(strategy, json.dumps(row), flush=True)
    engine.close()
    Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
