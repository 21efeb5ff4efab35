"""Code verifier: judge a candidate program against assert-tests without trusting its process.

RL optimises whatever the verifier pays for, so the verdict must not be something the
candidate can forge.  The process that runs the candidate's code (in the sandbox, see
:mod:`t2dist.verifiers.sandbox`) holds no expected value and decides nothing:

1. The tests are parsed here, once (:mod:`t2dist.verifiers.testplan`), into the calls into the
   candidate's code (``add(2, 3)``) and trusted comparisons (``v0 == 5``,
   ``math.isclose(v0, 3.14159, rel_tol=1e-3)``, ``abs(v0 - 1.2) < 1e-6``, ``v0 is True``...).
2. The candidate's sandbox runs the program, evaluates the calls and sends each value back as
   strict plain data (:mod:`t2dist.verifiers.plain`): an object with its own ``__eq__``, a
   subclass of ``int``/``str``, a generator or a class cannot be encoded and is a failure.
3. This process decodes the values into genuine builtins and evaluates the comparisons.

Tests that cannot be transformed (loops, helper functions, random inputs: 0 of 500 MBPP and
6 of 164 HumanEval tests) run in a second sandbox, the *judge*, which executes only the tests
and reaches the candidate's functions through proxies over the same data-only channel; its
exit status decides (see :mod:`t2dist.verifiers.harness`).

A task can also pass a *trusted setup*: its own helper code that the tests call (HumanEval 32
``poly``, 38 ``encode_cyclic``, 50 ``encode_shift``, defined in the prompt stub).  The candidate's
program may redefine those names (``def poly(xs, x): return 0`` makes any answer a root), so tests
that read a name the setup binds always take the judge path, and the judge runs the setup
itself: the tests' ``poly`` is the task's, the candidate's copy is only the candidate's business.

So monkeypatching builtins or modules, tracing hooks, reading frames or ``gc`` (there is no
secret to steal), exit codes, ``sys.exit``/``os._exit``, printing success markers, closing or
redirecting stdout, threads that outlive the call: none of it changes the verdict, which
depends only on the values the candidate's functions return.  (A program can still hard-code
the answers of tests shown in the prompt, as MBPP shows them; no verifier can tell that apart.)
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

from t2dist.task_types import Verdict
from t2dist.verifiers import harness
from t2dist.verifiers.audit import audit_program
from t2dist.verifiers.plain import PlainDataError, decode, unhex
from t2dist.verifiers.sandbox import SandboxPool, SandboxResult, default_pool
from t2dist.verifiers.testplan import (
    Plan,
    TestSyntaxError,
    free_names,
    implicit_modules,
    plan_tests,
    setup_names,
    shadowed_builtins,
)

__all__ = ["CodeCheck", "check_code", "check_code_batch", "code_verdicts"]

_SANDBOX_FAILURES = ("timeout", "memory", "output_limit", "killed")


@dataclass
class CodeCheck:
    """Verdict on one program.  ``status``: passed, failed, error, timeout, memory,
    output_limit, syntax (or killed).  ``detail`` is a short human-readable reason."""

    passed: bool
    status: str
    detail: str


def _last_line(text: str, limit: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def _sandbox_failure(res: SandboxResult) -> CodeCheck | None:
    if res.status in _SANDBOX_FAILURES:
        return CodeCheck(False, res.status, _last_line(res.stderr) or f"returncode {res.returncode}")
    return None


class _Frames:
    """The candidate's frames, read strictly: values and exceptions by index, a program error, the end."""

    def __init__(self, stdout: str, n: int):
        self.values: dict[int, Any] = {}
        self.raised: dict[int, tuple[list[str], str]] = {}
        self.error: tuple[str, str] | None = None
        self.ended = False
        self.corrupt = ""
        for line in stdout.splitlines():
            try:
                self._take(json.loads(line), n)
            except (ValueError, TypeError, RecursionError, PlainDataError) as exc:
                self.corrupt = f"malformed result frame ({type(exc).__name__})"
                return

    def _take(self, f: Any, n: int) -> None:
        if type(f) is not list or not f or self.ended or self.error or self.raised:
            raise ValueError("frame out of place")
        kind = f[0]
        if kind == "end" and len(f) == 1:
            self.ended = True
        elif kind == "e" and len(f) == 3 and f[1] in ("syntax", "error"):
            self.error = (f[1], unhex(f[2]))
        elif kind in ("v", "x") and type(f[1]) is int and f[1] == len(self.values) < n:
            if kind == "v" and len(f) == 3:
                self.values[f[1]] = decode(f[2])
            elif kind == "x" and len(f) == 4 and type(f[2]) is list:
                self.raised[f[1]] = ([unhex(x) for x in f[2]], unhex(f[3]))
            else:
                raise ValueError("bad value frame")
        else:
            raise ValueError("unknown frame")


def _judge_plan(plan: Plan, res: SandboxResult) -> CodeCheck:
    failure = _sandbox_failure(res)
    if failure:
        return failure
    frames = _Frames(res.stdout, plan.n_values)
    if frames.corrupt:
        return CodeCheck(False, "error", frames.corrupt)
    if frames.error:
        kind, message = frames.error
        if message.startswith("SystemExit"):
            return CodeCheck(False, "failed", f"exited before the tests completed ({message})")
        return CodeCheck(False, "memory" if message.startswith("MemoryError") else kind, message)
    values = [frames.values.get(i) for i in range(plan.n_values)]
    for chk in plan.checks:
        for i in chk.uses:
            if i in frames.raised:
                names, message = frames.raised[i]
                status = "failed" if "PlainDataError" in names else "memory" if "MemoryError" in names else "error"
                return CodeCheck(False, status, f"{message} (in {chk.source})")
            if i not in frames.values:
                return CodeCheck(False, "failed", "exited before the tests completed")
        try:
            ok = bool(eval(chk.code, plan.globals(values)))  # noqa: S307 - trusted code on decoded builtins
        except Exception as exc:  # noqa: BLE001 - a comparison that raises is a failed assert
            return CodeCheck(False, "failed", f"{type(exc).__name__}: {exc} (in {chk.source})"[:300])
        if not ok:
            got = ", ".join(repr(values[i])[:80] for i in chk.uses)
            return CodeCheck(False, "failed", f"AssertionError: {chk.source} (got {got})"[:300])
    if not frames.ended:
        return CodeCheck(False, "failed", "exited before the tests completed")
    return CodeCheck(True, "passed", "")


def _judge_linked(cand: SandboxResult, judge: SandboxResult) -> CodeCheck:
    if judge.status == "ok" and f"\n{harness.JUDGE_PASS}\n" in judge.stdout:
        return CodeCheck(True, "passed", "")
    failure = _sandbox_failure(cand) if cand.status != "killed" else None
    failure = failure or _sandbox_failure(judge)
    if failure:
        return failure
    last = _last_line(judge.stderr)
    if judge.returncode == harness.EXIT_SYNTAX and harness.SYNTAX_MARK in judge.stderr:
        return CodeCheck(False, "syntax", last)
    if last.startswith("AssertionError"):
        return CodeCheck(False, "failed", last)
    return CodeCheck(False, "error", last or f"returncode {judge.returncode}")


def _submit(pool: SandboxPool, program: str, tests: str, setup: str) -> tuple[Any, Future | CodeCheck]:
    try:
        trusted = setup_names(setup)
        shadowed = shadowed_builtins(program, tests) - trusted
        # tests that call the setup's helpers need them on the trusted side: the judge runs the setup
        plan = None if trusted & set(free_names(tests, keep_builtins=True)) else plan_tests(tests, shadowed)
    except TestSyntaxError as exc:
        return None, CodeCheck(False, "error", str(exc)[:300])
    if plan is not None:
        return plan, pool.submit(harness.candidate_source(program, plan.steps))
    modules = implicit_modules(tests)
    names = sorted((set(free_names(tests)) | shadowed) - set(modules) - trusted)
    return None, pool.submit_linked(harness.serve_source(program), harness.judge_source(tests, names, modules, setup))


def check_code_batch(
    programs: Sequence[str], tests: Sequence[str], pool: SandboxPool | None = None,
    setups: Sequence[str] | None = None,
) -> list[CodeCheck]:
    """Judge each ``programs[i]`` against ``tests[i]`` (asserts), in parallel sandboxes.

    ``setups[i]``: the task's trusted helper code that ``tests[i]`` calls (default: none); it runs
    only in the judge, never with the candidate.  Uses :func:`t2dist.verifiers.sandbox.default_pool`
    unless ``pool`` is given.
    """
    programs, tests = list(programs), list(tests)
    setups = [""] * len(programs) if setups is None else list(setups)
    if not len(programs) == len(tests) == len(setups):
        raise ValueError(f"programs, tests and setups differ in length ({len(programs)}, {len(tests)}, {len(setups)})")
    if not programs:
        return []
    pool = pool or default_pool()
    jobs = [_submit(pool, p, t, s) for p, t, s in zip(programs, tests, setups)]
    out = []
    for plan, job in jobs:
        if isinstance(job, CodeCheck):
            out.append(job)
        elif plan is not None:
            out.append(_judge_plan(plan, job.result()))
        else:
            out.append(_judge_linked(*job.result()))
    return out


def check_code(program: str, test: str, pool: SandboxPool | None = None, setup: str = "") -> CodeCheck:
    """:func:`check_code_batch` for one program."""
    return check_code_batch([program], [test], pool, [setup])[0]


def code_verdicts(programs: Sequence[str], tests: Sequence[str], setups: Sequence[str] | None = None,
                  pool: SandboxPool | None = None) -> list[Verdict]:
    """:func:`check_code_batch` as task verdicts (reward +1/-1, ``parsed`` the status), each with the
    program's :func:`~t2dist.verifiers.audit.audit_program` flags (what it does besides defining functions)."""
    programs = list(programs)
    checks = check_code_batch(programs, tests, pool, setups)
    return [Verdict(1.0 if c.passed else -1.0, c.passed, c.status, c.detail, tuple(sorted(audit_program(p))))
            for c, p in zip(checks, programs)]
