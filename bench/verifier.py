"""Time per code check: the previous in-process harness vs the out-of-process judge, side by side.

    python bench/verifier.py                 # MBPP 500 + HumanEval 164 + 200 synthetic `code` + 400 `pyfunc` tasks
    python bench/verifier.py --limit 100 --workers 2 --repeats 3

The old path is kept here, verbatim in behaviour (program and tests exec'd in one sandboxed
process, a per-job nonce on stdout), as :func:`old_check_code_batch`, so both run in the same
process on the same pool, alternating, on the reference solutions.  Prints a markdown table:
seconds per check (wall time of a batch / checks, best of ``--repeats``), the new/old ratio, the new
path's checks per second (with ``--workers`` sandboxes at once) and both pass rates.  The issue's bar is a ratio <= 1.5.
"""
from __future__ import annotations

import argparse
import os
import secrets
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from t2dist.verifiers.code import CodeCheck, check_code_batch  # noqa: E402
from t2dist.verifiers.sandbox import SandboxLimits, SandboxPool, SandboxResult  # noqa: E402

_OLD_HARNESS = """\
def _t2dist_harness(program, tests):
    import os, sys
    nonce = sys.stdin.readline().strip()
    try:
        test_code = compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write("tests do not compile: %r\\n" % (e,))
        os._exit(98)
    try:
        program_code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write("T2DIST-SYNTAX-ERROR: %s\\n" % (e,))
        sys.stderr.flush()
        os._exit(97)
    namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
    del program, tests
    exec(program_code, namespace)
    exec(test_code, namespace)
    sys.stdout.flush()
    os.write(1, ("\\n" + nonce + "\\n").encode())


_t2dist_harness({program!r}, {tests!r})
"""


def _old_judge(res: SandboxResult, nonce: str) -> CodeCheck:
    if res.status in ("timeout", "memory", "output_limit", "killed"):
        return CodeCheck(False, res.status, "")
    if res.returncode == 0 and f"\n{nonce}\n" in res.stdout:
        return CodeCheck(True, "passed", "")
    if res.returncode == 97:
        return CodeCheck(False, "syntax", "")
    return CodeCheck(False, "failed" if res.returncode == 0 or "AssertionError" in res.stderr else "error", "")


def old_check_code_batch(programs, tests, pool: SandboxPool) -> list[CodeCheck]:
    """The verifier before issue 17: the verdict was the candidate process's exit code and stdout."""
    nonces = [secrets.token_hex(16) for _ in programs]
    sources = [_OLD_HARNESS.format(program=p, tests=t) for p, t in zip(programs, tests)]
    results = pool.run_many(sources, [n + "\n" for n in nonces])
    return [_old_judge(r, n) for r, n in zip(results, nonces)]


def _cases(limit: int | None) -> dict[str, tuple[list[str], list[str]]]:
    from t2dist.tasks import get_task

    out = {}
    for name in ("mbpp", "humaneval"):
        task = get_task(name)
        exs = [e for s in ("train", "validation", "test") for e in task.examples(s)][:limit]
        out[name] = ([task.program(task.reference_completion(e), e) for e in exs], [e.answer for e in exs],
                     [task.trusted_setup(e) for e in exs])
    code = get_task("code")
    exs = code.examples("test")[: limit or 200]
    out["code (synthetic)"] = ([code.program(e.meta["completion"]) for e in exs], [e.meta["tests"] for e in exs], None)
    pyfunc = get_task("pyfunc")  # the real-model code task: five asserts on a few-line function
    exs = pyfunc.examples("test")[: limit or 400]
    out["pyfunc"] = ([pyfunc.program(pyfunc.reference_completion(e), e) for e in exs], [e.answer for e in exs], None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="examples per benchmark (default: all)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sets", help="comma-separated sets to time (default: all): mbpp, humaneval, code, pyfunc")
    args = ap.parse_args()
    pool = SandboxPool(SandboxLimits(cpu_seconds=30, wall_seconds=120), workers=args.workers)
    print(f"| set | checks | old s/check | new s/check | new/old | new checks/s | old passed | new passed |\n"
          "|---|---|---|---|---|---|---|---|")
    wanted = {x.strip() for x in args.sets.split(",")} if args.sets else None
    for name, (programs, tests, setups) in _cases(args.limit).items():
        if wanted and name.split(" ")[0] not in wanted:
            continue
        best = {"old": float("inf"), "new": float("inf")}
        passed = {}
        for _ in range(args.repeats):
            for label, fn in (("old", lambda: old_check_code_batch(programs, tests, pool)),
                              ("new", lambda: check_code_batch(programs, tests, pool, setups=setups))):
                t0 = time.perf_counter()
                checks = fn()
                best[label] = min(best[label], (time.perf_counter() - t0) / len(programs))
                passed[label] = sum(c.passed for c in checks)
        print(f"| {name} | {len(programs)} | {best['old']:.4f} | {best['new']:.4f} | "
              f"{best['new'] / best['old']:.2f} | {1 / best['new']:.1f} | {passed['old']}/{len(programs)} | "
              f"{passed['new']}/{len(programs)} |")
    pool.close()


if __name__ == "__main__":
    main()
