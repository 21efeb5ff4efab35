"""Run untrusted Python source in a subprocess sandbox.

Threat model.  The source comes from a policy under RL training: it may be buggy, resource-
hungry or written to escape, and it is optimised against whatever the code verifier rewards.
The sandbox protects the host (files, network, other processes, the trainer); the verifier in
:mod:`t2dist.verifiers.code` protects the *reward*: the candidate's process holds no expected
value and no secret, sends back only plain data, and the verdict is computed in a process that
never ran candidate code (this one, or a second "judge" sandbox joined by two pipes, see
:meth:`SandboxPool.submit_linked`).  So nothing a job does inside its own process (patching
modules or builtins, tracing hooks, frame/``gc`` introspection, ``ctypes`` writes to its own
memory, exit codes, forged output) can change a verdict.

Isolation, from the outside in (bubblewrap mode, the default):

* **Namespaces** (bubblewrap): new PID, network, IPC, UTS and mount namespaces.  The job
  sees no network (not even a working loopback), only its own processes, and a filesystem
  made of read-only binds of ``/usr`` (with the ``/lib``, ``/lib64``, ``/bin`` symlinks) and of
  the base interpreter's prefix (its ``site-packages`` hidden under an empty tmpfs), a fresh
  ``/proc`` and minimal ``/dev``, and a small private tmpfs ``/tmp`` that is also the cwd.
  No ``/etc``, ``/home``, ``/root``, ``/work``.  The environment is cleared.
  ``--die-with-parent`` and ``--new-session`` tie the sandbox to us and cut it off the
  terminal; when bwrap's PID-1 dies the kernel kills every process in the namespace, so a
  wall-clock kill of bwrap reaps fork bombs and daemons alike.
* **seccomp** (bubblewrap's ``--seccomp``): a filter built with libseccomp (Debian's
  ``python3-seccomp``, see :func:`seccomp_program`) answers EPERM to the system calls untrusted
  Python never needs (:data:`SECCOMP_DENY`: ptrace and process_vm_*, mount and namespace calls,
  ``clone`` with namespace flags, keyctl, bpf, perf_event_open, io_uring, userfaultfd, kexec,
  module loading, reboot, swap, clock setting...); ``clone3`` answers ENOSYS so that glibc uses
  ``clone``, whose flags the filter can read; system calls of another architecture (i386
  ``int 0x80``) kill the job.  On by default; ``SandboxPool(seccomp=False)`` turns it off.
* **Unprivileged uid**: if we are root, a user namespace would map the job to host uid 0,
  which the kernel exempts from ``RLIMIT_NPROC``.  So as root we run bwrap *without* a
  user namespace, grant the launcher only ``CAP_SETUID``/``CAP_SETGID``, and the launcher
  switches to a fresh random uid/gid (no passwd entry, owns nothing on the host) before any
  untrusted code runs; that drops all capabilities, and ``no_new_privs`` is set by bwrap.
  As a normal user, bwrap's user namespace is used instead (``--unshare-all``,
  ``--disable-userns``): ``RLIMIT_NPROC`` then counts processes per namespace.  Linked jobs
  (candidate and judge) each get their own sandbox and uid.
* **rlimits** set by the launcher inside the sandbox: address space (memory), CPU seconds,
  processes+threads (``RLIMIT_NPROC``, which contains fork and thread bombs), file size
  (``RLIMIT_FSIZE``), no core dumps.
* **Wall clock and output caps** enforced by the parent: the job is killed at
  ``wall_seconds`` or as soon as stdout or stderr exceeds ``max_output_bytes``.

Known limits: ``RLIMIT_AS`` is per process, so a job's total memory can reach
``max_processes * memory_mb`` (plus ``tmp_mb`` of tmpfs).  A cgroup v2 memory cap would bound
the whole job, but it needs a delegated cgroup v2 subtree; the machines this was built on run
the legacy cgroup v1 hierarchy (``/sys/fs/cgroup/memory``, no ``cgroup.controllers``), so there
is no cgroup cap and the rlimits stay the memory bound.  A program can still hard-code the
answers of tests it was shown (MBPP prompts show them); no verifier can tell that apart.

rlimits-only mode (no bubblewrap, only with ``allow_rlimits_only=True``) keeps the
rlimits, wall clock, output caps, cleared environment and a fresh temporary cwd, and (as
root) the switch to a fresh uid, but has **no** filesystem, network or PID isolation and no
seccomp filter.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "SandboxPool",
    "SandboxUnavailableError",
    "default_pool",
    "configure_default_pool",
]

#: Statuses a :class:`SandboxResult` can carry.
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed")

_SANDBOX_SOURCE = "/sandbox/main.py"
_EXIT_GRACE = 0.25  # seconds to drain pipes after the job's main process has exited
# Random uids are drawn from [_UID_LO, _UID_LO + _UID_SPAN): far above any real account.
_UID_LO, _UID_SPAN = 1 << 24, 1 << 28

# Runs first inside the sandbox, under ``python -I -S``: switch uid (root mode), set the
# rlimits, then run the job's source as ``__main__``.  argv: uid limits... source_path.
_LAUNCHER = r"""
import os, resource, sys
uid, mem, cpu, nproc, fsize, path = sys.argv[1:7]
extra = sys.argv[7:]
if int(uid) >= 0:
    os.setgroups([])
    os.setresgid(int(uid), int(uid), int(uid))
    os.setresuid(int(uid), int(uid), int(uid))
    if os.getuid() == 0 or os.geteuid() == 0:
        os._exit(125)
for res, val in ((resource.RLIMIT_AS, int(mem) << 20), (resource.RLIMIT_CPU, int(cpu)),
                 (resource.RLIMIT_NPROC, int(nproc)), (resource.RLIMIT_FSIZE, int(fsize) << 20),
                 (resource.RLIMIT_CORE, 0)):
    # CPU: the soft limit sends SIGXCPU (reported as "timeout"); the hard one SIGKILLs a second later
    resource.setrlimit(res, (val, val + 1 if res == resource.RLIMIT_CPU else val))
with open(path, encoding="utf-8") as fh:
    src = fh.read()
sys.argv = ["main.py", *extra]
del uid, mem, cpu, nproc, fsize, fh, res, val, extra
code = compile(src, "main.py", "exec")
del src
g = {"__name__": "__main__", "__builtins__": __builtins__}
del os, resource, path
exec(code, g)
"""


# System calls untrusted Python never needs; denied (EPERM) by the seccomp filter in bubblewrap mode.
SECCOMP_DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",  # reading other processes
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsconfig", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr", "open_by_handle_at", "name_to_handle_at",  # filesystems, namespaces
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "personality", "lookup_dcookie", "quotactl", "syslog", "vhangup",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff",
    "acct", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname",
)
# clone() with any of these flags (new namespaces) is denied; clone3 (flags behind a pointer, which a
# filter cannot read) answers ENOSYS, so glibc falls back to clone() for threads and fork.
_CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_SECCOMP_SCRIPT = r"""
import errno, sys
import seccomp
deny, flags = sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")]
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
for name in deny:
    try:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    except (ValueError, RuntimeError, OSError):
        pass  # not a system call on this architecture
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
for flag in flags:
    f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
f.export_bpf(sys.stdout)
"""


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes:
    """The compiled (classic BPF) seccomp filter for bubblewrap's ``--seccomp``, built once per process.

    Generated by libseccomp through Debian's Python bindings (``apt-get install python3-seccomp``),
    which import only with the system interpreter, so ``/usr/bin/python3`` (or ``python3`` on
    ``PATH``) builds it in a subprocess.  Raises :class:`SandboxUnavailableError` if that fails.
    """
    candidates = [p for p in ("/usr/bin/python3", shutil.which("python3")) if p and os.access(p, os.X_OK)]
    problem = "no system python3 found"
    for exe in dict.fromkeys(candidates):
        try:
            out = subprocess.run([exe, "-I", "-c", _SECCOMP_SCRIPT, ",".join(SECCOMP_DENY),
                                  ",".join(map(str, _CLONE_NS_FLAGS))],
                                 capture_output=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError) as exc:
            problem = f"{exe}: {exc}"
            continue
        if out.returncode == 0 and out.stdout and len(out.stdout) % 8 == 0:
            return out.stdout
        problem = f"{exe}: {out.stderr.decode(errors='replace').strip()[-300:]}"
    raise SandboxUnavailableError(
        f"cannot build the sandbox's seccomp filter ({problem}). Install libseccomp's Python bindings "
        "(apt-get install python3-seccomp; scripts/setup.sh does), or pass SandboxPool(seccomp=False)"
    )


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing and rlimits-only mode was not explicitly allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-job limits.  ``max_processes`` counts processes *and* threads of the job."""

    memory_mb: int = 512
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    max_processes: int = 32
    max_file_mb: int = 1
    max_output_bytes: int = 64 * 1024
    tmp_mb: int = 16  # size of the private /tmp tmpfs (bubblewrap mode)


@dataclass
class SandboxResult:
    """Outcome of one job.  ``status`` is one of :data:`STATUSES` (best effort)."""

    returncode: int | None
    stdout: str
    stderr: str
    status: str
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _base_python() -> tuple[str, str]:
    """The real (non-venv) interpreter and its prefix: only the stdlib is needed."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe), os.path.realpath(sys.base_prefix)


class SandboxPool:
    """Runs jobs in parallel sandboxes; a ThreadPoolExecutor drives one subprocess each.

    Args:
        limits: per-job :class:`SandboxLimits`.
        workers: jobs in flight at once (default ``os.cpu_count()``).
        allow_rlimits_only: if bubblewrap is missing or cannot start a sandbox here (checked
            once, at construction), run with rlimits only (weaker, logged as a warning)
            instead of raising :class:`SandboxUnavailableError`.
        bwrap_path: the bubblewrap binary (default: ``bwrap`` on ``PATH``).
        seccomp: in bubblewrap mode, load the :data:`SECCOMP_DENY` filter (default on).  If it
            cannot be built: :class:`SandboxUnavailableError`, or with ``allow_rlimits_only`` a
            warning and no filter.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        allow_rlimits_only: bool = False,
        bwrap_path: str | None = None,
        seccomp: bool = True,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self._seccomp: bytes | None = None
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.python, self.prefix = _base_python()
        found = bwrap_path if bwrap_path is not None else shutil.which("bwrap")
        self.bwrap: str | None = found if found and os.access(found, os.X_OK) else None
        # As root, jobs run under a fresh uid so that RLIMIT_NPROC applies (root is exempt).
        self._switch_uid = os.geteuid() == 0
        problem = None
        if self.bwrap is None:
            problem = f"bubblewrap (bwrap) not found{f' at {bwrap_path!r}' if bwrap_path else ' on PATH'}"
        else:  # bwrap may exist yet be unable to work (e.g. user namespaces disabled): probe once
            if seccomp:
                try:
                    self._seccomp = seccomp_program()
                except SandboxUnavailableError as exc:
                    if not allow_rlimits_only:
                        raise
                    log.warning("%s; running bubblewrap WITHOUT a seccomp filter", exc)
            probe = self._run_one("print('t2dist-sandbox-ok')", "")
            if probe.stdout != "t2dist-sandbox-ok\n":
                problem = f"bubblewrap at {self.bwrap} cannot start a sandbox: {probe.stderr.strip()[-300:]!r}"
                self.bwrap = None
        if problem:
            if not allow_rlimits_only:
                raise SandboxUnavailableError(
                    f"{problem}. Install a working bubblewrap to run generated code, or set "
                    "sandbox.allow_rlimits_only=true (SandboxPool(allow_rlimits_only=True)) to accept "
                    "rlimits-only isolation (no filesystem, network or process isolation)"
                )
            log.warning(
                "%s: running generated code with rlimits and a wall clock only; this mode has NO "
                "filesystem, network or PID-namespace isolation", problem
            )
        self.mode = "bwrap" if self.bwrap else "rlimits"
        self.seccomp = self.bwrap is not None and self._seccomp is not None
        if self.bwrap is None and self._switch_uid and not _readable_by_all(self.prefix):
            # Without bubblewrap the fresh uid must be able to read the host's stdlib in place.
            self._switch_uid = False
            log.warning(
                "rlimits-only sandbox: %s is not readable by other users, so jobs run as root and "
                "RLIMIT_NPROC (fork-bomb protection) is NOT enforced", self.prefix
            )
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="t2dist-sandbox")
        self._closed = False

    # ------------------------------------------------------------------ public API
    def run(self, source: str, stdin: str = "") -> SandboxResult:
        """Run one job and wait for it."""
        self._check_open()
        return self._executor.submit(self._run_one, source, stdin).result()

    def run_many(self, sources: Sequence[str], stdins: Sequence[str] | None = None) -> list[SandboxResult]:
        """Run jobs in parallel; results come back in the order of ``sources``."""
        self._check_open()
        stdins = list(stdins) if stdins is not None else [""] * len(sources)
        if len(stdins) != len(sources):
            raise ValueError("sources and stdins differ in length")
        futures = [self._executor.submit(self._run_one, s, i) for s, i in zip(sources, stdins)]
        return [f.result() for f in futures]

    def submit(self, source: str, stdin: str = "") -> Future:
        """Start one job; the future gives its :class:`SandboxResult`."""
        self._check_open()
        return self._executor.submit(self._run_one, source, stdin)

    def submit_linked(self, source_a: str, source_b: str) -> Future:
        """Start two jobs, each in its own sandbox (own uid, namespaces, limits), joined by two pipes.

        Job ``a`` reads what ``b`` writes and vice versa: both get ``sys.argv[1:3] == [read_fd,
        write_fd]``.  Nothing else is shared.  The future gives ``(result_a, result_b)``; ``a`` is
        killed as soon as ``b`` has ended (``b`` is the side whose outcome matters).
        """
        self._check_open()
        return self._executor.submit(self._run_linked, source_a, source_b)

    def close(self) -> None:
        """Wait for jobs in flight (each ends within its wall limit) and stop the threads."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SandboxPool is closed")

    # ------------------------------------------------------------------ one job
    def _run_linked(self, source_a: str, source_b: str) -> tuple[SandboxResult, SandboxResult]:
        a_read, b_write = os.pipe()
        b_read, a_write = os.pipe()
        open_fds = {a_read, a_write, b_read, b_write}
        spawned: list[subprocess.Popen] = []
        started = threading.Event()
        out: list[SandboxResult | BaseException] = []

        def close(*fds: int) -> None:  # our copies, once the job holds its own
            for fd in fds:
                if fd in open_fds:
                    open_fds.discard(fd)
                    os.close(fd)

        def run_a() -> None:
            try:
                out.append(self._run_one(source_a, "", (a_read, a_write), lambda p: (spawned.append(p), started.set())))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                out.append(exc)
            finally:
                started.set()

        helper = threading.Thread(target=run_a, name="t2dist-sandbox-linked", daemon=True)
        try:
            helper.start()
            started.wait()
            close(a_read, a_write)
            res_b = self._run_one(source_b, "", (b_read, b_write), lambda _p: close(b_read, b_write))
        finally:
            close(*list(open_fds))
            if spawned and spawned[0].poll() is None:
                _kill_group(spawned[0].pid)  # b is over: a has nothing left to answer
            helper.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0], res_b

    def _run_one(self, source: str, stdin: str, fds: tuple[int, ...] = (), on_spawn=None) -> SandboxResult:
        lim = self.limits
        uid = _UID_LO + secrets.randbelow(_UID_SPAN) if self._switch_uid else -1
        start = time.monotonic()
        with contextlib.ExitStack() as stack:
            tmp = None if self.bwrap else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="t2dist-sbx-", ignore_cleanup_errors=True)
            )
            proc = self._spawn(source, uid, tmp, fds)
            if on_spawn is not None:
                on_spawn(proc)
            try:
                out, err, over, timed_out = _communicate(
                    proc, stdin.encode("utf-8", "surrogatepass"), start + lim.wall_seconds, lim.max_output_bytes
                )
            finally:
                self._reap(proc, uid)
        rc = proc.returncode
        return SandboxResult(
            returncode=rc,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            status=_classify(rc, err, over, timed_out, in_bwrap=self.bwrap is not None),
            wall_seconds=time.monotonic() - start,
        )

    def _spawn(self, source: str, uid: int, tmp: str | None, fds: tuple[int, ...] = ()) -> subprocess.Popen:
        """Start the job: under bwrap (source passed through a memfd) or, with ``tmp``, rlimits only.

        ``fds`` are inherited by the job (their numbers follow the source path in the launcher's argv)."""
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        extra = [str(f) for f in fds]
        if tmp is None:
            fd = _memfd("t2dist-job", source.encode("utf-8", "surrogatepass"))
            sfd = _memfd("t2dist-seccomp", self._seccomp) if self._seccomp is not None else None
            try:
                return subprocess.Popen(self._bwrap_argv(fd, uid, sfd) + extra,
                                        pass_fds=(fd, *fds) if sfd is None else (fd, sfd, *fds), env={}, cwd="/",
                                        **pipes)
            finally:
                os.close(fd)
                if sfd is not None:
                    os.close(sfd)
        path = os.path.join(tmp, "main.py")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(source)
        os.chmod(path, 0o444)
        if uid >= 0:
            os.chown(tmp, uid, uid)
        argv = [self.python, "-I", "-S", "-X", "utf8", "-c", _LAUNCHER, *self._limit_args(uid), path, *extra]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"}
        return subprocess.Popen(argv, env=env, cwd=tmp, pass_fds=fds, **pipes)

    def _limit_args(self, uid: int) -> list[str]:
        lim = self.limits
        return [str(uid), str(lim.memory_mb), str(lim.cpu_seconds), str(lim.max_processes), str(lim.max_file_mb)]

    def _bwrap_argv(self, fd: int, uid: int, seccomp_fd: int | None = None) -> list[str]:
        """bubblewrap command line; see the module docstring for the reasoning."""
        lim = self.limits
        argv = [self.bwrap or "bwrap"]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        if uid >= 0:  # root: no user namespace (it would map to uid 0); the launcher drops to `uid`
            argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                     "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-all", "--unshare-user", "--disable-userns"]
        argv += ["--die-with-parent", "--new-session", "--clearenv",
                 "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
                 "--hostname", "sandbox",
                 "--ro-bind", "/usr", "/usr"]
        for link in ("lib", "lib64", "bin", "sbin"):
            if os.path.islink(f"/{link}"):
                argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
            elif os.path.isdir(f"/{link}"):
                argv += ["--ro-bind", f"/{link}", f"/{link}"]
        if not self.prefix.startswith("/usr/"):
            parent = os.path.dirname(self.prefix)
            ancestors = []
            while parent not in ("/", ""):
                ancestors.insert(0, parent)
                parent = os.path.dirname(parent)
            for d in ancestors:  # traversable mount points, e.g. /root is 0700 on the host
                argv += ["--perms", "0755", "--dir", d]
            argv += ["--ro-bind", self.prefix, self.prefix]
        site = os.path.join(self.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
        if os.path.isdir(site):
            argv += ["--tmpfs", site]  # hide the base interpreter's third-party packages
        argv += ["--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(lim.tmp_mb << 20), "--tmpfs", "/tmp",
                 "--perms", "0444", "--ro-bind-data", str(fd), _SANDBOX_SOURCE,
                 "--chdir", "/tmp", "--",
                 self.python, "-I", "-S", "-X", "utf8", "-c", _LAUNCHER, *self._limit_args(uid), _SANDBOX_SOURCE]
        return argv

    def _reap(self, proc: subprocess.Popen, uid: int) -> None:
        """Kill whatever is left of a job; never leaves a zombie or a stray process."""
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            _kill_group(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if the kernel is stuck
            log.error("sandbox process %d did not die", proc.pid)
        if self.bwrap is None:
            _kill_group(proc.pid)  # children that outlived the job in its process group
            if uid >= 0:
                _kill_uid(uid)  # ... and ones that left the group: everything running as `uid`


def _memfd(name: str, data: bytes) -> int:
    """A close-on-exec memory file holding ``data``, positioned at its start."""
    fd = os.memfd_create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _readable_by_all(path: str) -> bool:
    """Whether any user can reach ``path`` (o+x on every ancestor) and read it (o+rx)."""
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            if not os.stat(parent).st_mode & 0o001:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a fresh uid used by one job only)."""
    try:
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover
        log.warning("could not reap processes of sandbox uid %d: %s", uid, e)


def _communicate(
    proc: subprocess.Popen, data: bytes, deadline: float, cap: int
) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and collect stdout/stderr until EOF, the deadline or the output cap.

    Returns ``(stdout, stderr, over_cap, timed_out)``; output is truncated to ``cap`` bytes.
    """
    assert proc.stdin and proc.stdout and proc.stderr
    bufs: dict[int, bytearray] = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    wfd = proc.stdin.fileno()
    if data:
        os.set_blocking(wfd, False)
        sel.register(wfd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    view, over, timed_out, open_reads = memoryview(data), False, False, len(bufs)
    try:
        while open_reads:
            now = time.monotonic()
            if proc.poll() is not None and deadline > now + _EXIT_GRACE:
                # the job is over; don't wait on pipes held open by processes it left behind
                deadline = now + _EXIT_GRACE
            remaining = deadline - now
            if remaining <= 0:
                timed_out = proc.poll() is None
                break
            for key, _ in sel.select(min(remaining, 0.05)):
                fd = key.fd
                if fd == wfd:
                    try:
                        n = os.write(fd, view[:65536])
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, OSError):
                        n = len(view)
                    view = view[n:]
                    if not view:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    open_reads -= 1
                    continue
                buf = bufs[fd]
                buf += chunk
                if len(buf) > cap:
                    del buf[cap:]
                    over = True
            if over:
                break
        if not over and not timed_out:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), over, timed_out


def _classify(rc: int | None, err: bytes, over: bool, timed_out: bool, in_bwrap: bool) -> str:
    if over:
        return "output_limit"
    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if in_bwrap and rc is not None and rc > 128 else 0)
    if sig == signal.SIGXCPU:
        return "timeout"
    tail = err[-2048:]
    if b"MemoryError" in tail:
        return "memory"
    if sig:
        return "killed"
    return "error"


# ---------------------------------------------------------------------- default pool
_default: SandboxPool | None = None
_default_args: dict = {}
_default_lock = threading.Lock()


def configure_default_pool(
    limits: SandboxLimits | None = None, workers: int | None = None, allow_rlimits_only: bool = False,
    seccomp: bool = True,
) -> None:
    """Set how :func:`default_pool` builds the process-wide pool (replaces an existing one)."""
    global _default
    with _default_lock:
        _default_args.clear()
        _default_args.update(limits=limits, workers=workers, allow_rlimits_only=allow_rlimits_only, seccomp=seccomp)
        old, _default = _default, None
    if old is not None:
        old.close()


def default_pool() -> SandboxPool:
    """The process-wide pool, created on first use (see :func:`configure_default_pool`)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SandboxPool(**_default_args)
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()
