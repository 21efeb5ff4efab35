"""bench/serve.py on the toy with tiny numbers: it starts the real server twice (strategies prompt and cls), runs
every mode's workloads through the openai client, and writes the issue's keys (the numbers themselves are
the integrator's, on SmolLM2 and a quiet machine)."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_serving_bench_runs_end_to_end_on_the_toy(toy_experts, tmp_path, monkeypatch):
    out = tmp_path / "serve.json"
    argv = ["bench/serve.py", "--json", str(out), "--model", "toy", "--registry", toy_experts["registry"],
            "--task", "mixed", "--n", "6", "--concurrency", "3", "--engine", "hf", "ray.address=local",
            f"svf.cache_dir={toy_experts['factors']}", "serve.threads_per_replica=1", "serve.cpus_per_replica=0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "bench" / "serve.py"), run_name="__main__")
    assert done.value.code == 0
    res = json.loads(out.read_text())
    for key in ("base_tokens_per_s", "mixed_experts_vs_base", "auto_vs_named", "dispatch_share",
                "switches_per_request", "auto_accuracy", "dispatch_accuracy", "goals"):
        assert key in res, key
    runs = res["modes"]["exact"]["runs"]
    assert set(runs) >= {"base", "one_expert", "experts", "auto_prompt", "auto_cls"}
    for name in ("base", "one_expert", "experts", "auto_prompt", "auto_cls"):
        r = runs[name]
        assert r["requests"] == 6 and 0 <= r["accuracy"] <= 1 and r["output_tokens_per_s"] > 0
    assert runs["one_expert"]["switches"] <= 1  # one expert: at most the switch to it
    assert 0 < res["dispatch_share"]["prompt"] < 1 and set(res["auto_accuracy"]) == {"prompt", "cls"}
    assert out.with_suffix(".md").read_text().startswith("# t2dist serve bench")
