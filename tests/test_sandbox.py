"""Sandbox and code-verifier tests against real bubblewrap.

Hostile programs are written so that they would *pass* (define the right ``f``) if the
attack worked; a containment failure therefore shows up as ``passed == True``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from t2dist.verifiers import sandbox as sbx
from t2dist.verifiers.code import CodeCheck, check_code, check_code_batch
from t2dist.verifiers.sandbox import (
    SandboxLimits,
    SandboxPool,
    SandboxUnavailableError,
    configure_default_pool,
    default_pool,
)

LIMITS = SandboxLimits(memory_mb=256, cpu_seconds=2, wall_seconds=3.0, max_processes=16, max_file_mb=1)
SLACK = 5.0  # seconds on top of wall_seconds for start-up and reaping on a busy machine
GOOD = "f = lambda x: (x + 3) * 2\n"
TEST = "assert f(1) == 8\nassert f(0) == 6\n"
REPO = Path(__file__).resolve().parents[1]
HAS_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")


def _descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _sandbox_uid_procs() -> list[int]:
    """Processes running under a uid from the sandbox's random-uid range."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if uid >= sbx._UID_LO:
                pids.append(int(entry))
    return pids


_PREEXISTING: set[int] = set()


@pytest.fixture(autouse=True)
def _note_preexisting_children():
    """Children that existed before the test (a multiprocessing resource tracker left by an
    earlier test module, say) are not the sandbox's strays."""
    _PREEXISTING.clear()
    _PREEXISTING.update(_descendants(os.getpid()))
    yield


def _assert_no_strays(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        strays = [p for p in _descendants(os.getpid()) if p not in _PREEXISTING] + _sandbox_uid_procs()
        if not strays or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not strays, f"stray sandbox processes: {strays}"


@pytest.fixture(scope="module")
def pool():
    if not HAS_BWRAP:
        pytest.skip("bubblewrap not installed")
    with SandboxPool(LIMITS, workers=2) as p:
        assert p.mode == "bwrap"
        yield p


# ----------------------------------------------------------------------------- normal cases
@needs_bwrap
def test_correct_program_passes(pool):
    assert check_code(GOOD, TEST, pool) == CodeCheck(True, "passed", "")
    assert check_code("def f(x):\n    return (x + 3) * 2\n", TEST, pool).passed


@needs_bwrap
def test_wrong_answer_fails(pool):
    chk = check_code("f = lambda x: x + 3\n", TEST, pool)
    assert not chk.passed and chk.status == "failed"


@needs_bwrap
def test_syntax_error(pool):
    chk = check_code("f = lambda x: (x + \n", TEST, pool)
    assert not chk.passed and chk.status == "syntax"
    bad_test = check_code(GOOD, "assert f(1 ==\n", pool)
    assert not bad_test.passed and bad_test.status == "error"


@needs_bwrap
def test_runtime_error(pool):
    chk = check_code("f = lambda x: 1 / 0\n", TEST, pool)
    assert not chk.passed and chk.status == "error" and "ZeroDivisionError" in chk.detail


@needs_bwrap
def test_parallel_batch_in_order(pool):
    n = 40
    programs = [f"f = lambda x: x + {i}\n" for i in range(n)]
    tests = [f"assert f(1) == {i + 1 if i % 7 else i + 2}\n" for i in range(n)]
    t0 = time.monotonic()
    checks = check_code_batch(programs, tests, pool)
    assert time.monotonic() - t0 < n * (LIMITS.wall_seconds + SLACK)
    assert [c.passed for c in checks] == [i % 7 != 0 for i in range(n)]
    assert check_code_batch([], [], pool) == []


@needs_bwrap
def test_sandbox_result_fields(pool):
    r = pool.run("import sys\nprint(sys.stdin.read().upper())\nsys.stderr.write('e')\n", stdin="abc")
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("ok", 0, "ABC\n", "e")
    assert 0 < r.wall_seconds < LIMITS.wall_seconds + SLACK
    r = pool.run("raise SystemExit(3)")
    assert (r.status, r.returncode) == ("error", 3)


# ----------------------------------------------------------------------------- hostile cases
def _hostile_cases(tmp_name: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (program, acceptable statuses). Each defines the right ``f`` only if the attack worked."""
    pyproject = REPO / "pyproject.toml"
    here = Path(__file__).resolve()
    host_tmp = f"/tmp/{tmp_name}"
    in_repo = REPO / tmp_name
    fail = {"failed", "error"}
    return {
        "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n" + GOOD,
                      {"timeout", "error", "killed"}),
        "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n" + GOOD, {"memory", "killed"}),
        "infinite_loop": ("while True:\n    pass\n" + GOOD, {"timeout"}),
        "long_sleep": ("import time\ntime.sleep(1000)\n" + GOOD, {"timeout"}),
        "huge_output": ("while True:\n    print('x' * 1000)\n" + GOOD, {"output_limit"}),
        "huge_stderr": ("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n" + GOOD, {"output_limit"}),
        "net_localhost": ("import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)\n" + GOOD, fail),
        "net_external": ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + GOOD, fail),
        "read_project": (f"open({str(pyproject)!r}).read()\n" + GOOD, fail),
        "read_own_test_file": (f"open({str(here)!r}).read()\n" + GOOD, fail),
        "read_shadow": ("open('/etc/shadow').read()\n" + GOOD, fail),
        "list_host_dirs": ("import os\nassert os.listdir('/work') or os.listdir('/home') or os.listdir('/etc')\n"
                           + GOOD, fail),
        "write_outside": (f"open({host_tmp!r}, 'w').write('x')\nopen({str(in_repo)!r}, 'w').write('x')\n" + GOOD,
                          fail),
        "write_root": ("open('/pwned', 'w').write('x')\n" + GOOD, fail),
        "kill_parent": ("import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\n" + GOOD, fail),
        "kill_everything": ("import os\nos.kill(-1, 9)\n" + GOOD, {"killed", "error"}),
        "os_system": (f"import os\nassert os.system('touch {in_repo}.sys && ls /work') == 0\n" + GOOD, fail),
        "subprocess": ("import subprocess\nsubprocess.run(['cat', '/etc/passwd'], check=True)\n" + GOOD, fail),
        "ctypes_segfault": ("import ctypes\nctypes.string_at(0)\n" + GOOD, {"killed"}),
        "deep_recursion": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef g(n):\n    return g(n + 1) + 1\ng(0)\n"
                           + GOOD, {"killed", "error", "memory", "timeout"}),
        "huge_file": ("open('/tmp/big', 'wb').write(b'x' * (8 << 20))\n" + GOOD, fail),
        "early_sys_exit": ("f = lambda x: 0\nimport sys\nsys.exit(0)\n", {"failed"}),
        "early_os_exit": ("f = lambda x: 0\nimport os\nos._exit(0)\n", {"failed"}),
        "fake_marker": ("f = lambda x: 0\nimport os\nprint('passed\\nOK\\nall tests passed')\nos._exit(0)\n",
                        {"failed"}),
        "steal_nonce_from_stdin": ("import os, sys\nprint(sys.stdin.read())\nos._exit(0)\n", {"failed"}),
        "thread_bomb": ("import threading, time\nwhile True:\n"
                        "    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n" + GOOD,
                        {"error", "timeout", "memory"}),
        "host_env": ("import os\nassert os.environ.get('T2DIST_TEST_SECRET') == 'hunter2'\n" + GOOD, fail),
        "host_env_proc": ("assert b'hunter2' in open('/proc/1/environ', 'rb').read()\n" + GOOD, fail),
        "site_packages": ("import pytest\n" + GOOD, fail),
        "torch": ("import torch\n" + GOOD, fail),
        "daemon_escape": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
                          "raise SystemExit(1)\n" + GOOD, fail),
        "raise_limits": ("import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))\n" + GOOD, fail),
    }


HOSTILE_TMP_NAME = f"t2dist-sbx-{uuid.uuid4().hex}"
HOSTILE = _hostile_cases(HOSTILE_TMP_NAME)


@pytest.fixture(scope="module")
def hostile(pool):
    """Run every hostile case as one parallel batch (with a secret in our environment and a
    listening socket on the host), then report per case and what the host saw."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    names = list(HOSTILE)
    programs = [HOSTILE[n][0].replace("PORT", str(port)) for n in names]
    t0 = time.monotonic()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("T2DIST_TEST_SECRET", "hunter2")
            checks = check_code_batch(programs, [TEST] * len(programs), pool)
    finally:
        stop.set()
        acceptor.join()
        listener.close()
    return {"checks": dict(zip(names, checks)), "elapsed": time.monotonic() - t0, "accepted": accepted}


@needs_bwrap
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_case_fails(hostile, name):
    chk = hostile["checks"][name]
    assert not chk.passed, f"{name} escaped: {chk}"
    assert chk.status in HOSTILE[name][1], chk


@needs_bwrap
def test_hostile_batch_leaves_host_untouched_and_pool_serving(hostile, pool):
    # each job ends within its own limit; the batch runs on pool.workers lanes
    assert hostile["elapsed"] < len(HOSTILE) * (LIMITS.wall_seconds + SLACK) / pool.workers + SLACK
    assert not hostile["accepted"], "a sandboxed job reached a host socket"
    for p in (Path("/tmp") / HOSTILE_TMP_NAME, REPO / HOSTILE_TMP_NAME, REPO / f"{HOSTILE_TMP_NAME}.sys",
              Path("/pwned")):
        assert not p.exists(), p
    _assert_no_strays()
    assert os.getppid() > 0  # we (the pool's parent) are alive after "kill_parent"
    assert check_code(GOOD, TEST, pool).passed


@needs_bwrap
def test_fork_bomb_leaves_no_processes(pool):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = pool.run(bomb)
    assert r.status in ("timeout", "error", "killed")
    assert r.wall_seconds < LIMITS.wall_seconds + SLACK
    _assert_no_strays()
    assert pool.run("print(1)").stdout == "1\n"


@needs_bwrap
def test_fork_bomb_is_bounded_by_nproc(pool):
    r = pool.run(
        "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n"
        "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)\n"
    )
    assert r.status == "ok", r
    assert int(r.stdout) < LIMITS.max_processes
    _assert_no_strays()


@needs_bwrap
def test_sandbox_view(pool):
    r = pool.run(
        "import os, sys\nprint(sorted(os.listdir('/')))\nprint(os.getcwd())\nprint(sorted(os.environ))\n"
        "print(os.getuid() != 0, sys.flags.isolated, sys.flags.no_site)\n"
    )
    top, cwd, env, flags = r.stdout.splitlines()
    assert not {"work", "home", "etc"} & set(eval(top))
    assert cwd == "/tmp"
    assert "T2DIST_TEST_SECRET" not in env and "VIRTUAL_ENV" not in env
    assert flags == "True 1 1"


# ----------------------------------------------------------------------------- seccomp
SECCOMP_PROBE = (
    "import ctypes, os, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def probe(name, *args):\n    r = getattr(libc, name)(*args)\n    print(name, r, ctypes.get_errno() if r < 0 else 0, flush=True)\n"
    "pid = os.fork()\nif pid == 0:\n    probe('ptrace', 0, 0, 0, 0)\n    os._exit(0)\n"  # PTRACE_TRACEME, in a child
    "os.waitpid(pid, 0)\n"
    "probe('personality', 0xffffffff)\n"  # a query, harmless without a filter
    "probe('syscall', 272, 0x10000000)\n"  # unshare(CLONE_NEWUSER)
    "t = threading.Thread(target=print, args=('thread ok',))\nt.start()\nt.join()\n"
    "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint('fork ok', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
)


@needs_bwrap
def test_seccomp_denies_calls_python_never_needs(pool):
    assert pool.seccomp  # on by default in bubblewrap mode
    r = pool.run(SECCOMP_PROBE)
    assert r.status == "ok", r
    lines = r.stdout.splitlines()
    eperm = str(errno.EPERM)
    assert lines[:3] == [f"ptrace -1 {eperm}", f"personality -1 {eperm}", f"syscall -1 {eperm}"], r.stdout
    assert lines[3:] == ["thread ok", "fork ok 7"]  # ordinary programs still run
    assert check_code(GOOD, TEST, pool).passed


@needs_bwrap
def test_without_seccomp_the_probe_calls_succeed():
    """The probe can tell: without the filter ptrace(TRACEME) and personality() succeed."""
    with SandboxPool(LIMITS, workers=1, seccomp=False) as p:
        assert not p.seccomp
        lines = p.run(SECCOMP_PROBE).stdout.splitlines()
    assert lines[0] == "ptrace 0 0" and lines[1].startswith("personality ") and not lines[1].startswith(
        "personality -1")


def test_seccomp_filter_is_built_with_libseccomp():
    prog = sbx.seccomp_program()
    assert len(prog) % 8 == 0 and len(prog) > 8 * len(sbx.SECCOMP_DENY)  # one BPF instruction is 8 bytes


# ----------------------------------------------------------------------------- rlimits-only mode
def test_rlimits_only_refused_without_flag():
    with pytest.raises(SandboxUnavailableError, match="bubblewrap.*allow_rlimits_only"):
        SandboxPool(LIMITS, bwrap_path="/nonexistent/bwrap")


def test_broken_bwrap_is_detected_at_construction():
    with pytest.raises(SandboxUnavailableError, match="cannot start a sandbox"):
        SandboxPool(LIMITS, bwrap_path="/usr/bin/false")
    with SandboxPool(LIMITS, workers=1, allow_rlimits_only=True, bwrap_path="/usr/bin/false") as p:
        assert p.mode == "rlimits"
        assert check_code(GOOD, TEST, p).passed


def test_rlimits_only_with_flag(caplog, monkeypatch):
    monkeypatch.setenv("T2DIST_TEST_SECRET", "hunter2")
    with caplog.at_level(logging.WARNING, logger="t2dist.verifiers.sandbox"):
        p = SandboxPool(LIMITS, workers=2, allow_rlimits_only=True, bwrap_path="/nonexistent/bwrap")
    assert any("NO filesystem" in rec.getMessage() for rec in caplog.records)
    with p:
        assert p.mode == "rlimits"
        checks = check_code_batch(
            [GOOD, "f = lambda x: x\n", "while True:\n    pass\n", "f = lambda x: (x +\n",
             "f = lambda x: 0\nimport os\nos._exit(0)\n", "while True:\n    print('x' * 1000)\n"],
            [TEST] * 6, p,
        )
        assert [c.status for c in checks] == ["passed", "failed", "timeout", "syntax", "failed", "output_limit"]
        r = p.run("import os\nprint(os.getcwd(), 'T2DIST_TEST_SECRET' in os.environ)")
        cwd, seen = r.stdout.split()
        assert r.status == "ok" and "t2dist-sbx-" in cwd and seen == "False"
        if p._switch_uid:  # root with a world-readable stdlib: jobs run under a fresh uid, so NPROC applies
            r = p.run("import os, time\nfor _ in range(100):\n    if os.fork() == 0:\n        os.setsid()\n"
                      "        time.sleep(1000)\n")
            assert r.status == "error" and "Resource temporarily unavailable" in r.stderr
            _assert_no_strays()
        assert check_code(GOOD, TEST, p).passed


# ----------------------------------------------------------------------------- default pool
@needs_bwrap
def test_default_pool_is_shared_and_configurable():
    try:
        configure_default_pool(LIMITS, workers=1)
        a = default_pool()
        assert a is default_pool() and a.limits == LIMITS and a.workers == 1
        assert check_code(GOOD, TEST).passed  # uses the default pool
        configure_default_pool(SandboxLimits(wall_seconds=2.0), workers=1)
        assert default_pool() is not a and default_pool().limits.wall_seconds == 2.0
        with pytest.raises(RuntimeError, match="closed"):
            a.run("pass")
    finally:
        configure_default_pool()
