"""Reward hacks against the code verifier: every one must fail, the honest programs must pass.

Each hack is a program that does not solve its problem but tries to earn ``passed=True``
anyway (always-equal objects, patched modules and builtins, frame/gc introspection, forged
output, early exits, tampering with the harness...).  They run against assert-style tests that
take the transformed path (MBPP- and HumanEval-shaped) and against tests with a loop, which
take the judge-sandbox path.  ``test_some_hacks_fooled_the_old_verifier`` shows (with the
previous in-process harness, kept in ``bench/verifier.py``) that the cases are real attacks.
"""
from __future__ import annotations

import shutil

import pytest

from t2dist.verifiers import plain
from t2dist.verifiers.code import check_code_batch
from t2dist.verifiers.sandbox import SandboxLimits, SandboxPool
from t2dist.verifiers.testplan import plan_tests, shadowed_builtins

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
LIMITS = SandboxLimits(memory_mb=256, cpu_seconds=2, wall_seconds=4.0, max_processes=16)

TESTS = {
    "add": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(10, 5) == 15\n",
    "add_he": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n",
    "add_loop": "for a, b in [(2, 3), (-1, 1), (10, 5)]:\n    assert add(a, b) == a + b\n",
    "area": "import math\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n"
            "assert math.isclose(area(2), 12.56636, rel_tol=1e-3)\n",
    "area_noimport": "assert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n",  # relies on the program's import
    "area_noimport_loop": "for r, a in [(1, 3.14159), (2, 12.56636)]:\n    assert math.isclose(area(r), a, rel_tol=1e-3)\n",
    "area_abs": "assert abs(area(1) - 3.14159) < 1e-3\nassert abs(area(2) - 12.56636) < 1e-3\n",
    "even": "assert is_even(4)\nassert not is_even(3)\nassert is_even(0) is True\nassert is_even(7) is False\n",
    "greet": "assert greet('bob') == 'hi bob'\nassert greet('al') == 'hi al'\n",
    "pairs": "assert set(pairs([1, 2, 3])) == {(1, 2), (2, 3)}\nassert sorted(pairs([5, 6])) == [(5, 6)]\n",
    "counts": "assert counts('aab') == {'a': 2, 'b': 1}\n",
}
HONEST = {
    "add": "def add(a, b):\n    return a + b\n",
    "add_he": "def add(a, b):\n    return a + b\n",
    "add_loop": "def add(a, b):\n    return a + b\n",
    "area": "import math\ndef area(r):\n    return math.pi * r * r\n",
    "area_abs": "import math\ndef area(r):\n    return math.pi * r * r\n",
    "area_noimport": "import math\ndef area(r):\n    return math.pi * r * r\n",
    "area_noimport_loop": "import math\ndef area(r):\n    return math.pi * r * r\n",
    "even": "def is_even(n):\n    return n % 2 == 0\n",
    "greet": "def greet(name):\n    return 'hi ' + name\n",
    "pairs": "def pairs(xs):\n    return (tuple(p) for p in zip(xs, xs[1:]))\n",  # a generator, wrapped by set()/sorted()
    "counts": "from collections import Counter\ndef counts(s):\n    return Counter(s)\n",
}

ALWAYS_EQ = "class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n        return False\n" \
            "    __hash__ = object.__hash__\n"
HACKS: dict[str, tuple[str, str]] = {
    # objects whose comparisons lie
    "always_equal": (ALWAYS_EQ + "add = lambda a, b: A()\n", "add"),
    "always_equal_he": (ALWAYS_EQ + "add = lambda a, b: A()\n", "add_he"),
    "always_equal_loop": (ALWAYS_EQ + "add = lambda a, b: A()\n", "add_loop"),
    "int_subclass": ("class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                     "add = lambda a, b: I(0)\n", "add"),
    "int_subclass_loop": ("class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                          "add = lambda a, b: I(0)\n", "add_loop"),
    "str_subclass": ("class S(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__\n"
                     "greet = lambda n: S('x')\n", "greet"),
    "bool_dunder": ("class B:\n    def __bool__(self):\n        return True\nis_even = lambda n: B()\n", "even"),
    "float_dunder_isclose": ("class F:\n    def __float__(self):\n        return 3.14159\narea = lambda r: F()\n", "area"),
    "sub_dunder_abs": ("class F:\n    def __sub__(self, o):\n        return 0\narea = lambda r: F()\n", "area_abs"),
    "hash_eq_in_set": ("class P:\n    def __hash__(self):\n        return hash((1, 2))\n    def __eq__(self, o):\n"
                       "        return True\npairs = lambda xs: [P(), P()]\n", "pairs"),
    "fake_counter": ("class D(dict):\n    __module__ = 'collections'\n    def __eq__(self, o):\n        return True\n"
                     "counts = lambda s: D()\n", "counts"),
    "generator_result": ("def add(a, b):\n    yield a + b\n", "add"),
    "class_result": ("add = lambda a, b: int\n", "add"),
    # patching what the tests rely on
    "patch_math_isclose": ("import math\nmath.isclose = lambda *a, **k: True\narea = lambda r: 0\n", "area"),
    "patch_sys_modules_math": ("import sys, types\nm = types.ModuleType('math')\nm.isclose = lambda *a, **k: True\n"
                               "sys.modules['math'] = m\narea = lambda r: 0\n", "area"),
    "patch_math_tests_do_not_import": ("import math\nmath.isclose = lambda *a, **k: True\narea = lambda r: 0\n",
                                       "area_noimport"),
    "fake_math_module": ("class math:\n    isclose = staticmethod(lambda *a, **k: True)\narea = lambda r: 0\n",
                         "area_noimport"),
    "fake_math_module_loop": ("class math:\n    isclose = staticmethod(lambda *a, **k: True)\narea = lambda r: 0\n",
                              "area_noimport_loop"),
    "patch_builtin_abs": ("import builtins\nbuiltins.abs = lambda x: 0\narea = lambda r: 0.0\n", "area_abs"),
    "patch_builtin_set_sorted": (ALWAYS_EQ + "import builtins\nbuiltins.set = lambda *a: A()\n"
                                 "builtins.sorted = lambda *a, **k: A()\npairs = lambda xs: []\n", "pairs"),
    "shadow_sorted_for_expected": ("def sorted(x):\n    return x\npairs = lambda xs: [(5, 6)] if len(xs) == 2 "
                                   "else [(0, 0)]\n", "pairs"),
    "patch_builtin_loop": ("import builtins\nbuiltins.AssertionError = SystemExit\nadd = lambda a, b: 0\n", "add_loop"),
    # reading the harness / expected values out of the interpreter
    "expected_from_caller_bytecode": ("import sys, dis\ndef add(a, b):\n    f = sys._getframe(1)\n"
                                      "    for x in dis.get_instructions(f.f_code):\n"
                                      "        if x.offset > f.f_lasti and x.opname == 'LOAD_CONST':\n"
                                      "            return x.argval\n    return -7\n", "add"),
    "expected_from_frames": ("import sys\ndef add(a, b):\n    f, seen = sys._getframe(1), []\n    while f:\n"
                             "        seen += [v for v in f.f_locals.values() if type(v) is int and v not in (a, b)]\n"
                             "        seen += [c for c in f.f_code.co_consts if type(c) is int and c not in (a, b)]\n"
                             "        f = f.f_back\n    return seen[0] if seen else -7\n", "add"),
    "expected_from_gc": ("import gc, re\ndef add(a, b):\n    for o in gc.get_objects():\n        if type(o) is dict:\n"
                         "            for v in list(o.values()):\n                consts = getattr(v, 'co_consts', ())\n"
                         "                for c in consts if type(consts) is tuple else ():\n"
                         "                    m = type(c) is str and re.search(r'add\\(%d, %d\\) == (-?\\d+)' % (a, b), c)\n"
                         "                    if m:\n                        return int(m.group(1))\n    return -7\n", "add"),
    "empty_the_test_list": ("import sys, ctypes\nf = sys._getframe()\nwhile f:\n    for k in ('steps', 'exprs', 'tests'):\n"
                            "        if k in f.f_locals:\n            f.f_locals[k] = ()\n"
                            "            ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(f), ctypes.c_int(0))\n"
                            "    f = f.f_back\nadd = lambda a, b: 0\n", "add"),
    "settrace_skip": ("import sys\ndef t(frame, event, arg):\n    if event == 'call' and frame.f_code.co_name in "
                      "('send', '_t2_dumps'):\n        raise SystemExit(0)\n    return t\nsys.settrace(t)\n"
                      "add = lambda a, b: 0\n", "add"),
    "patch_json": ("import json\njson.dumps = lambda *a, **k: '[\"end\"]'\nadd = lambda a, b: 0\n", "add"),
    # forged output, exit codes, channels
    "print_success_markers": ("import os\nprint('T2DIST-JUDGE-PASS\\nOK\\n[\"end\"]')\nos._exit(0)\n", "add"),
    "print_markers_judge": ("import os\nprint('\\nT2DIST-JUDGE-PASS\\n')\nos.write(1, b'\\nT2DIST-JUDGE-PASS\\n')\n"
                            "add = lambda a, b: 0\n", "add_loop"),
    "forge_frames_garbage": ("import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'[\"v\", 0, ')\n"
                             "    except OSError:\n        pass\nadd = lambda a, b: 0\n", "add"),
    "close_stdout": ("import os, sys\nos.close(1)\nsys.stdout = open(os.devnull, 'w')\nadd = lambda a, b: 0\n", "add"),
    "os_exit_before_asserts": ("import os\nadd = lambda a, b: os._exit(0)\n", "add"),
    "os_exit_before_asserts_loop": ("import os\nadd = lambda a, b: os._exit(0)\n", "add_loop"),
    "sys_exit_in_atexit": ("import atexit, os\natexit.register(lambda: os._exit(0))\nadd = lambda a, b: 0\n", "add"),
    "exit_at_import": ("import sys\nadd = lambda a, b: 0\nsys.exit(0)\n", "add"),
    "kill_own_process_group": ("import os, signal\ndef add(a, b):\n    os.kill(0, signal.SIGKILL)\n", "add"),
    "kill_everything_loop": ("import os\ndef add(a, b):\n    os.kill(-1, 9)\n", "add_loop"),
    # exceptions that look like success
    "raise_system_exit_0": ("def add(a, b):\n    raise SystemExit(0)\n", "add"),
    "raise_keyboard_interrupt": ("def add(a, b):\n    raise KeyboardInterrupt\n", "add"),
    "raise_passed_exception": ("class Passed(Exception):\n    pass\ndef add(a, b):\n    raise Passed('all tests passed')\n",
                               "add_he"),
    "raise_in_loop_judge": ("def add(a, b):\n    raise StopIteration\n", "add_loop"),
    # skipping the asserts by exhausting resources
    "recursion_limit": ("import sys\nsys.setrecursionlimit(12)\nadd = lambda a, b: 0\n", "add"),
    "deep_recursion_result": ("def add(a, b):\n    return add(a, b)\n", "add"),
    "infinite_loop": ("def add(a, b):\n    while True:\n        pass\n", "add"),
    "infinite_loop_judge": ("def add(a, b):\n    while True:\n        pass\n", "add_loop"),
    "huge_result": ("add = lambda a, b: 'x' * (10 ** 7)\n", "add"),
    "thread_outlives_check": ("import threading, os, time\ndef spam():\n    while True:\n"
                              "        os.write(1, b'[\"end\"]\\n')\n        time.sleep(0.001)\n"
                              "threading.Thread(target=spam, daemon=True).start()\nadd = lambda a, b: 0\n", "add"),
    "thread_answers_later": ("import threading, time\nR = [0]\ndef later():\n    time.sleep(0.5)\n    R[0] = 5\n"
                             "threading.Thread(target=later).start()\nadd = lambda a, b: R[0]\n", "add"),
    # the tests file and harness
    "tamper_sandbox_source": ("open('/sandbox/main.py', 'w').write('')\nadd = lambda a, b: 0\n", "add"),
    "read_stdin_for_secrets": ("import sys\nX = sys.stdin.read()\nadd = lambda a, b: len(X)\n", "add"),
}
assert len(HACKS) >= 30


@pytest.fixture(scope="module")
def pool():
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    with SandboxPool(LIMITS, workers=2) as p:
        yield p


@pytest.fixture(scope="module")
def verdicts(pool):
    names = list(HACKS)
    checks = check_code_batch([HACKS[n][0] for n in names], [TESTS[HACKS[n][1]] for n in names], pool)
    return dict(zip(names, checks))


@needs_bwrap
def test_honest_programs_pass(pool):
    checks = check_code_batch([HONEST[k] for k in TESTS], list(TESTS.values()), pool)
    assert {k: c.status for k, c in zip(TESTS, checks)} == {k: "passed" for k in TESTS}


@needs_bwrap
@pytest.mark.parametrize("name", list(HACKS))
def test_hack_fails(verdicts, name):
    chk = verdicts[name]
    assert not chk.passed, f"{name} forged a pass: {chk}"
    assert chk.status in ("failed", "error", "timeout", "memory", "output_limit", "killed", "syntax"), chk


RAISES = "try:\n    root(-4)\nexcept ValueError:\n    pass\nelse:\n    assert False, 'no ValueError'\nassert root(9) == 3\n"


@needs_bwrap
def test_expected_exceptions(pool):
    """A test that expects an exception (judge path): the builtin type crosses by name, nothing else does."""
    programs = {
        "honest": "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return int(x ** 0.5)\n",
        "never_raises": "def root(x):\n    return int(abs(x) ** 0.5)\n",
        "wrong_type": "def root(x):\n    if x < 0:\n        raise TypeError('negative')\n    return int(x ** 0.5)\n",
        "raises_always": "def root(x):\n    raise ValueError('always')\n",
        "exits": "import os\ndef root(x):\n    os._exit(0)\n",
    }
    checks = dict(zip(programs, check_code_batch(list(programs.values()), [RAISES] * len(programs), pool)))
    assert plan_tests(RAISES) is None
    assert {k: c.passed for k, c in checks.items()} == {"honest": True, "never_raises": False, "wrong_type": False,
                                                        "raises_always": False, "exits": False}, checks


def test_the_paths_are_the_ones_meant():
    """Asserts, HumanEval's check() and isclose/abs take the transformed path; the loop the judge's."""
    for key in ("add", "add_he", "area", "area_noimport", "area_abs", "even", "greet", "pairs", "counts"):
        assert plan_tests(TESTS[key]) is not None, key
    assert plan_tests(TESTS["add_loop"]) is None and plan_tests(TESTS["area_noimport_loop"]) is None
    plan = plan_tests(TESTS["area"])
    assert [s for k, s in plan.steps if k == "eval"] == ["area(1)", "area(2)"]  # no expected value goes there
    assert all("3.14" not in s and "12.5" not in s for _, s in plan.steps)
    he = plan_tests(TESTS["add_he"])
    assert [s for k, s in he.steps if k == "eval"] == ["add(2, 3)", "add(-1, 1)"]
    # work that grows with a candidate's value stays out of this process: such tests go to the judge
    for costly in ("assert f(2) ** 2 == 16\n", "assert f(2) * 3 == 12\n", "assert f(2) % 7 == 4\n",
                   "assert pow(f(2), 2) == 16\n"):
        assert plan_tests(costly) is None, costly
    # ... or on the candidate's side, where no expected value takes part
    assert plan_tests("assert list(range(f(2))) == [0, 1]\n").steps == (("eval", "list(range(f(2)))"),)
    assert plan_tests("assert f(2) == 2 ** 2 * 1\n") is not None  # constants alone are the tests' own work
    # a program defining ``sorted`` cannot take over the expected side when the tests name ``pairs``
    assert shadowed_builtins(HACKS["shadow_sorted_for_expected"][0], TESTS["pairs"]) == frozenset()
    assert shadowed_builtins("def sum(a, b):\n    return a - b\n", "assert sum(10, 15) == -5\n") == {"sum"}


def test_plain_codec_round_trip_and_refusals():
    value = [1, -2 ** 80, 2.5, float("inf"), 1 - 2j, "s\udc80", b"\x00", True, None, (1, (2,)), {3}, frozenset({4}),
             {"k": [1], 2: (3,)}]
    back = plain.loads(plain.dumps(value))
    assert back[1:] == value[1:] and [type(x) for x in back] == [type(x) for x in value]
    assert back[0] == 1 and type(back[0]) is int
    for bad in (type("I", (int,), {})(3), type("S", (str,), {})("x"), object(), (x for x in ()), int, [1, object()]):
        with pytest.raises(plain.PlainDataError):
            plain.dumps(bad)
    for forged in ('["i", "zz"]', '[1, 2]', '1.5', '"bare string"', '["l", 3]', '["d", [[["l", []], 1]]]',
                   '["s", [["q", "1"]]]', '["u", "zz"]', "[" * 5000 + "]" * 5000):
        with pytest.raises(plain.PlainDataError):
            plain.loads(forged)


@needs_bwrap
def test_some_hacks_fooled_the_old_verifier(pool):
    """The previous harness (program and tests in one process, a nonce on stdout) passed these."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "verifier.py"
    spec = importlib.util.spec_from_file_location("bench_verifier", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    old = bench.old_check_code_batch
    fooled = ["always_equal", "always_equal_he", "always_equal_loop", "int_subclass", "int_subclass_loop",
              "str_subclass", "sub_dunder_abs", "fake_counter", "patch_math_isclose", "patch_sys_modules_math",
              "patch_math_tests_do_not_import", "fake_math_module", "fake_math_module_loop", "patch_builtin_abs",
              "patch_builtin_set_sorted", "expected_from_caller_bytecode", "expected_from_gc"]
    checks = old([HACKS[n][0] for n in fooled], [TESTS[HACKS[n][1]] for n in fooled], pool)
    assert {n: c.passed for n, c in zip(fooled, checks)} == {n: True for n in fooled}
