"""The programs that run inside the sandboxes for the code verifier (sources, formatted per job).

* :func:`candidate_source` (the usual path): runs the candidate's program, then evaluates the
  plan's *observed* expressions (``f(2, 3)``) in its namespace and writes each value, encoded
  by the strict plain-data codec, as one JSON line on the job's original stdout.  The program's
  own ``print``s go to stderr (fd 1 is pointed at fd 2 before it runs), so they cannot mix with
  the frames; a program that writes frames itself can only send values of its choosing, which
  is no more than returning them.  Expected values and comparisons are not in this process.
* :func:`serve_source` + :func:`judge_source` (tests that cannot be transformed): two sandboxes
  joined by two pipes.  The judge runs the tests with every free name (the candidate's
  functions) bound to a proxy that sends ``["call", name, args, kwargs]`` as plain data; the
  candidate's side calls its function and answers ``["v", value]`` or ``["x", exception
  names, message]``.  The judge never executes candidate code, so its exit status and its
  ``PASS`` line on stdout can be trusted.

Frames, candidate to verifier (usual path), one JSON line each: ``["v", i, value]``,
``["x", i, names, message]`` (evaluating expression ``i`` raised), ``["e", "syntax"|"error",
message]`` (the program did not compile or raised), ``["end"]``; strings (names, messages) are
UTF-8 hex.  The sandboxed side writes this text without importing ``json``.
"""
from __future__ import annotations

import re

from t2dist.verifiers.plain import CODEC_SOURCE

__all__ = ["JUDGE_PASS", "SYNTAX_MARK", "EXIT_SYNTAX", "candidate_source", "serve_source", "judge_source"]

JUDGE_PASS = "T2DIST-JUDGE-PASS"
SYNTAX_MARK = "T2DIST-SYNTAX-ERROR"
EXIT_SYNTAX = 97

_COMMON = CODEC_SOURCE + r'''

def _t2_describe(e):
    try:
        return _t2_hex(("%s: %s" % (type(e).__name__, e))[:300])
    except BaseException:
        return _t2_hex(type(e).__name__)


def _t2_names(e):
    try:
        return "[" + ",".join([_t2_hex(c.__name__) for c in type(e).__mro__][:16]) + "]"
    except BaseException:
        return "[]"


def _t2_writer(fd):
    import os
    write = os.write

    def send(text):
        data = str.encode(text + "\n")
        while data:
            data = data[write(fd, data):]
    return send


def _t2_load(program):
    """Compile and run the program: its namespace, or None and an error frame."""
    try:
        code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError) as e:
        return None, '["e","syntax",' + _t2_describe(e) + "]"
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, ns)
    except BaseException as e:
        return None, '["e","error",' + _t2_describe(e) + "]"
    return ns, None
'''

_CANDIDATE = _COMMON + r'''

def _t2dist_candidate(program, steps):
    import os
    send = _t2_writer(os.dup(1))
    os.dup2(2, 1)
    ns, err = _t2_load(program)
    del program
    if err is not None:
        send(err)
        return
    i = 0
    for kind, src in steps:
        try:
            if kind == "exec":
                exec(compile(src, "<tests>", "exec"), ns)
                continue
            frame = '["v",%d,%s]' % (i, _t2_dumps(eval(compile(src, "<tests>", "eval"), ns)))
        except BaseException as e:
            send('["x",%d,%s,%s]' % (i, _t2_names(e), _t2_describe(e)) if kind == "eval"
                 else '["e","error",' + _t2_describe(e) + "]")
            return
        send(frame)
        i += 1
    send('["end"]')


_t2dist_candidate(@@program@@, @@steps@@)
'''

_SERVE = _COMMON + r'''

def _t2dist_serve(program):
    import os, sys
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    send, reader = _t2_writer(wfd), os.fdopen(rfd, "rb")
    os.dup2(2, 1)
    ns, err = _t2_load(program)
    del program
    send(err or '["ready"]')
    literals = {"__builtins__": {}, "null": None, "true": True, "false": False}
    while err is None:
        line = reader.readline()
        if not line:
            os._exit(0)
        try:
            _, name, args, kwargs = eval(line, dict(literals))  # JSON from the judge (tests' data only)
            args, kwargs = _t2_decode(args), _t2_decode(kwargs)
            frame = '["v",' + _t2_dumps(ns[_t2_unhex(name)](*args, **kwargs)) + "]"
        except BaseException as e:
            frame = '["x",%s,%s]' % (_t2_names(e), _t2_describe(e))
        send(frame)


_t2dist_serve(@@program@@)
'''

_JUDGE = CODEC_SOURCE + r'''

def _t2dist_judge(tests, names, modules):
    import builtins, json, os, sys
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    reader = os.fdopen(rfd, "rb")

    class CandidateError(Exception):
        """The candidate's side raised something that is not a builtin exception, or broke the channel."""

    def send(text):
        data = (text + "\n").encode()
        while data:
            data = data[os.write(wfd, data):]

    def recv():
        line = reader.readline(1 << 24)
        if not line.endswith(b"\n"):
            raise CandidateError("the candidate's process ended or sent a malformed frame")
        try:
            frame = json.loads(line)
        except (ValueError, RecursionError):
            raise CandidateError("malformed frame from the candidate") from None
        if type(frame) is not list or not frame or type(frame[0]) is not str:
            raise CandidateError("malformed frame from the candidate")
        return frame

    def text(field):
        try:
            return _t2_unhex(field)[:300]
        except (ValueError, TypeError):
            return "?"

    first = recv()
    if first[0] == "e" and len(first) == 3:
        if first[1] == "syntax":
            sys.stderr.write("%s: %s\n" % (MARK, text(first[2])))
            sys.stderr.flush()
            os._exit(EXIT_SYNTAX)
        raise CandidateError("the program raised %s" % (text(first[2]),))
    if first != ["ready"]:
        raise CandidateError("malformed first frame from the candidate")

    def rebuild(names, message):
        for n in names if type(names) is list else ():
            cls = getattr(builtins, text(n), None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(text(message))
        return CandidateError(text(message))

    def call(name, args, kwargs):
        send('["call",%s,%s,%s]' % (_t2_hex(name), _t2_dumps(tuple(args)), _t2_dumps(dict(kwargs))))
        frame = recv()
        if frame[0] == "v" and len(frame) == 2:
            try:
                return _t2_decode(frame[1])
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                raise CandidateError("malformed value from the candidate (%s)" % (exc,)) from None
        if frame[0] == "x" and len(frame) == 3:
            raise rebuild(frame[1], frame[2])
        raise CandidateError("malformed answer from the candidate")

    class Proxy:
        def __init__(self, name):
            self.__name__ = name

        def __call__(self, *args, **kwargs):
            return call(self.__name__, args, kwargs)

    ns = {"__name__": "__main__", "__builtins__": builtins}
    ns.update((n, Proxy(n)) for n in names)
    ns.update((m, __import__(m)) for m in modules)  # math/cmath the tests use without importing
    exec(compile(tests, "<tests>", "exec"), ns)
    sys.stdout.flush()
    os.write(1, ("\n" + PASS + "\n").encode())


MARK, EXIT_SYNTAX, PASS = @@mark@@, @@exit_syntax@@, @@judge_pass@@
_t2dist_judge(@@tests@@, @@names@@, @@modules@@)
'''


_TOKEN = re.compile(r"@@([a-z_]+)@@")


def _fill(template: str, **values: object) -> str:
    """Substitute ``@@name@@`` with ``repr(value)`` in one pass (a value's text is never re-scanned)."""
    return _TOKEN.sub(lambda m: repr(values[m.group(1)]), template)


def candidate_source(program: str, steps: tuple[tuple[str, str], ...]) -> str:
    return _fill(_CANDIDATE, program=program, steps=tuple(steps))


def serve_source(program: str) -> str:
    return _fill(_SERVE, program=program)


def judge_source(tests: str, names: list[str], modules: list[str] = ()) -> str:
    return _fill(_JUDGE, tests=tests, names=list(names), modules=list(modules), mark=SYNTAX_MARK,
                 exit_syntax=EXIT_SYNTAX, judge_pass=JUDGE_PASS)
