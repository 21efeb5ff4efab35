"""Code verifier: run a candidate program and its assert-tests in the sandbox.

Each job is one sandboxed process running a small harness:

1. read a per-job random nonce from stdin (before any untrusted code runs, so the
   candidate finds stdin exhausted);
2. compile the tests, then the program (a ``SyntaxError`` in the program is reported as
   status ``"syntax"``; compilation happens in the sandbox, never in the caller);
3. ``exec`` the program, then the tests, in one fresh namespace;
4. only then write the nonce to fd 1.

The parent judges ``passed`` = nonce seen in stdout **and** exit code 0, so a candidate
that exits early (``sys.exit(0)``, ``os._exit(0)``), prints a fixed success marker, or
kills itself cannot pass.  (A candidate that deliberately introspects the interpreter,
e.g. ``gc``/frames, to steal the nonce could still forge a pass: the nonce stops reward
hacks by early exit or fake output, not a targeted attack on the harness.)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

from t2dist.verifiers.sandbox import SandboxPool, SandboxResult, default_pool

__all__ = ["CodeCheck", "check_code", "check_code_batch"]

_EXIT_SYNTAX, _EXIT_TEST_SYNTAX = 97, 98
_SYNTAX_MARK = "T2DIST-SYNTAX-ERROR"

_HARNESS = """\
def _t2dist_harness(program, tests):
    import os, sys
    nonce = sys.stdin.readline().strip()
    try:
        test_code = compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write("tests do not compile: %r\\n" % (e,))
        os._exit({test_syntax})
    try:
        program_code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write("{mark}: %s\\n" % (e,))
        sys.stderr.flush()
        os._exit({syntax})
    namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
    del program, tests
    exec(program_code, namespace)
    exec(test_code, namespace)
    sys.stdout.flush()
    os.write(1, ("\\n" + nonce + "\\n").encode())


_t2dist_harness({program!r}, {tests!r})
"""


@dataclass
class CodeCheck:
    """Verdict on one program.  ``status``: passed, failed, error, timeout, memory,
    output_limit, syntax (or killed).  ``detail`` is a short human-readable reason."""

    passed: bool
    status: str
    detail: str


def _harness(program: str, tests: str) -> str:
    return _HARNESS.format(
        program=program, tests=tests, mark=_SYNTAX_MARK, syntax=_EXIT_SYNTAX, test_syntax=_EXIT_TEST_SYNTAX
    )


def _last_line(text: str, limit: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def _judge(res: SandboxResult, nonce: str) -> CodeCheck:
    if res.status in ("timeout", "memory", "output_limit", "killed"):
        return CodeCheck(False, res.status, _last_line(res.stderr) or f"returncode {res.returncode}")
    if res.returncode == 0 and f"\n{nonce}\n" in res.stdout:
        return CodeCheck(True, "passed", "")
    if res.returncode == _EXIT_SYNTAX and _SYNTAX_MARK in res.stderr:
        return CodeCheck(False, "syntax", _last_line(res.stderr))
    if res.returncode == _EXIT_TEST_SYNTAX:
        return CodeCheck(False, "error", _last_line(res.stderr))
    if res.returncode == 0:
        return CodeCheck(False, "failed", "exited before the tests completed")
    last = _last_line(res.stderr)
    if last.startswith("AssertionError"):
        return CodeCheck(False, "failed", last)
    return CodeCheck(False, "error", last or f"returncode {res.returncode}")


def check_code_batch(
    programs: Sequence[str], tests: Sequence[str], pool: SandboxPool | None = None
) -> list[CodeCheck]:
    """Run each ``programs[i]`` followed by ``tests[i]`` (asserts) in the sandbox, in parallel.

    Uses :func:`t2dist.verifiers.sandbox.default_pool` unless ``pool`` is given.
    """
    programs, tests = list(programs), list(tests)
    if len(programs) != len(tests):
        raise ValueError("programs and tests differ in length")
    if not programs:
        return []
    pool = pool or default_pool()
    nonces = [secrets.token_hex(16) for _ in programs]
    results = pool.run_many([_harness(p, t) for p, t in zip(programs, tests)], [n + "\n" for n in nonces])
    return [_judge(r, n) for r, n in zip(results, nonces)]


def check_code(program: str, test: str, pool: SandboxPool | None = None) -> CodeCheck:
    """:func:`check_code_batch` for one program."""
    return check_code_batch([program], [test], pool)[0]
