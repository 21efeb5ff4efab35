"""bench/code_transfer.py's bookkeeping: scoring more splits into an earlier result (``--add-to``)."""
from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ct = runpy.run_path(str(ROOT / "bench" / "code_transfer.py"), run_name="code_transfer")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval, written out here (independent of t2dist's)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def row(policy, bench, splits, k, n, seconds=10.0):
    lo, hi = wilson(k, n)
    return {"policy": policy, "benchmark": bench, "splits": splits, "correct": k, "n": n, "accuracy": k / n,
            "ci_low": lo, "ci_high": hi, "seconds": seconds}


def test_added_splits_sum_counts_and_recompute_intervals():
    old = {"command": "first", "rows": [row("base", "humaneval", ["test"], 11, 148), row("x", "humaneval", ["test"], 30, 148),
                                        row("base", "mbpp", ["test", "validation"], 9, 232)]}
    doc = ct["add_rows"](old, [row("base", "humaneval", ["validation"], 1, 16), row("x", "humaneval", ["validation"], 2, 16)],
                         "second")
    he = {r["policy"]: r for r in doc["rows"] if r["benchmark"] == "humaneval"}
    assert he["base"]["splits"] == ["test", "validation"] and (he["base"]["correct"], he["base"]["n"]) == (12, 164)
    assert (he["x"]["correct"], he["x"]["n"]) == (32, 164) and he["x"]["seconds"] == 20.0
    assert he["x"]["accuracy"] == pytest.approx(32 / 164)
    assert (he["x"]["ci_low"], he["x"]["ci_high"]) == pytest.approx(wilson(32, 164), abs=1e-9)
    lo, hi = wilson(12, 164)
    assert he["x"]["within_base_interval"] is (lo <= 32 / 164 <= hi)  # 19.5% vs the base's interval
    assert he["x"]["within_base_interval"] is False
    assert doc["commands"] == ["first", "second"] and old["rows"][0]["n"] == 148  # the old document is untouched
    assert next(r for r in doc["rows"] if r["benchmark"] == "mbpp")["n"] == 232


def test_a_split_scored_twice_is_refused():
    old = {"command": "first", "rows": [row("base", "humaneval", ["test"], 11, 148)]}
    with pytest.raises(SystemExit, match="already has split"):
        ct["add_rows"](old, [row("base", "humaneval", ["test"], 11, 148)], "again")


def test_bench_argument_names_the_benchmark_and_its_splits():
    assert ct["parse_bench"]("humaneval:validation") == ("humaneval", ("validation",))
    assert ct["parse_bench"]("mbpp:test+validation") == ("mbpp", ("test", "validation"))
    with pytest.raises(Exception, match="expected NAME:SPLIT"):
        ct["parse_bench"]("gsm8k:test")
