"""Turn assert-style tests into (candidate-side calls, trusted comparisons), parsed once with ``ast``.

``assert add(2, 3) == 5`` becomes one *observed* expression, ``add(2, 3)``, which the
candidate's sandbox evaluates and sends back as plain data (:mod:`t2dist.verifiers.plain`),
and one *trusted* expression, ``__t2v[0] == 5``, which the verifier evaluates itself on the
genuine builtins it decoded.  Expected values, tolerances and the comparison never reach the
candidate's process, so nothing it does there can make a wrong value compare equal.

What is observed: a call whose callee mentions a candidate name (``f(x)``, ``candidate(x)``,
``f(x).lower()``), and a call whose only arguments are observed calls (``list(f(x))``,
``set(f(x))``: no expected value takes part, so evaluating it next to the candidate gives it no
more power than choosing its return value, and generators/maps can be materialised there).
Everything else (comparisons, ``not``, ``abs(v - 1.2) < 1e-6``, ``math.isclose(v, 3.14,
rel_tol=1e-3)``, ``set(v) == set((4, 5))``, ``v[0]``) is evaluated on the trusted side, and
only node types, builtins and ``math``/``cmath`` functions from fixed allow-lists may appear
there (``*``, ``**``, ``%`` and ``range`` only where no candidate value takes part, so a huge
returned value cannot make the trusted side do unbounded work).

Shapes understood: module-level asserts, imports, assignments and expression statements
(MBPP, the synthetic code tasks) and HumanEval's ``def check(candidate): <the same>`` +
``check(entry_point)``.  Assignments and expression statements run on the candidate's side, in
order, to build inputs (MBPP 367's ``root = Node(1)``); a name bound only to a literal constant
(``METADATA = {...}``) is known on the trusted side too, any other test-bound name may appear in
an assert only inside an observed call.  Anything else (loops, ``if``, ``try``, helper functions,
comprehensions around candidate calls) gives ``None``: such tests run in a
separate judge sandbox instead (see :mod:`t2dist.verifiers.code`).  Over the shipped
benchmarks, all 500 MBPP tests and 158 of the 164 HumanEval tests take this path.
"""
from __future__ import annotations

import ast
import builtins
import cmath
import functools
import math
import re
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

__all__ = ["Check", "Plan", "TestSyntaxError", "plan_tests", "free_names", "implicit_modules", "setup_names",
           "shadowed_builtins"]

PLACEHOLDER = "__t2v"
TRUSTED_MODULES = {"math": math, "cmath": cmath}
# Builtins the trusted side may call on candidate values: cheap on bounded plain data.
SAFE_FUNCS = ("abs", "all", "any", "bool", "complex", "dict", "divmod", "enumerate", "float", "frozenset",
              "int", "isinstance", "len", "list", "max", "min", "repr", "reversed", "round", "set", "sorted",
              "str", "sum", "tuple", "type", "zip", "bytes", "ord", "chr", "hash")
CONST_ONLY_FUNCS = ("range", "pow")  # allowed only where no candidate value takes part
SAFE_MATH = ("isclose", "fabs", "sqrt", "floor", "ceil", "trunc", "isnan", "isinf", "isfinite", "pi", "e",
             "tau", "inf", "nan", "log", "log2", "log10", "exp", "sin", "cos", "tan", "atan", "atan2", "hypot",
             "degrees", "radians", "phase", "polar", "rect", "infj", "nanj", "copysign", "gcd")
SAFE_NAMES = ("True", "False", "None")
_ARITH = (ast.Add, ast.Sub, ast.Div, ast.FloorDiv, ast.BitAnd, ast.BitOr, ast.BitXor)
_CONST_ONLY_OPS = (ast.Mult, ast.Pow, ast.Mod, ast.LShift, ast.RShift, ast.MatMult)
_NODES = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Constant, ast.Tuple, ast.List, ast.Set,
          ast.Dict, ast.Subscript, ast.Slice, ast.Name, ast.Attribute, ast.Call, ast.IfExp, ast.keyword,
          ast.expr_context, ast.cmpop, ast.boolop, ast.unaryop, ast.operator)

SAFE_BUILTINS = {n: getattr(builtins, n) for n in SAFE_FUNCS + CONST_ONLY_FUNCS + SAFE_NAMES}


class TestSyntaxError(ValueError):
    """The tests themselves do not parse."""


@dataclass(frozen=True)
class Check:
    """One assert: ``code`` evaluates, on the trusted side, to the asserted value."""

    code: CodeType
    source: str
    uses: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """``steps`` run in order in the candidate's namespace after its program: ``("exec", stmt)``
    builds inputs, the i-th ``("eval", expr)`` is observed value ``i``.  ``env``: trusted globals."""

    steps: tuple[tuple[str, str], ...]
    checks: tuple[Check, ...]
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def n_values(self) -> int:
        return sum(kind == "eval" for kind, _ in self.steps)

    def globals(self, values: list[Any]) -> dict[str, Any]:
        return {"__builtins__": SAFE_BUILTINS, **self.env, PLACEHOLDER: values}


class _Unsupported(Exception):
    pass


class _Splitter:
    """Rewrites one assert's test expression; collects observed expressions."""

    def __init__(self, rename: dict[str, str], modules: dict[str, str], imported: set[str], consts: set[str],
                 cside: set[str], steps: list[tuple[str, str]], shadowed: frozenset[str]):
        self.rename, self.modules, self.imported, self.consts = rename, modules, imported, consts
        self.cside, self.steps, self.shadowed = cside, steps, shadowed
        self.uses: list[int] = []

    def is_candidate(self, name: str) -> bool:
        if name in self.rename or name in self.shadowed or name in self.cside:
            return True
        if name in self.modules or name in self.imported or name in self.consts or name == PLACEHOLDER:
            return False
        return not hasattr(builtins, name)

    def mentions_candidate(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and self.is_candidate(n.id) for n in ast.walk(node))

    def is_observed(self, node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        if self.mentions_candidate(node.func):
            return True
        return (isinstance(node.func, ast.Name) and node.func.id not in self.modules and not node.keywords
                and bool(node.args) and all(self.is_observed(a) for a in node.args))

    def observe(self, node: ast.expr) -> ast.expr:
        renamed = _Rename(self.rename).visit(_copy(node))
        idx = sum(kind == "eval" for kind, _ in self.steps)
        self.steps.append(("eval", ast.unparse(renamed)))
        self.uses.append(idx)
        return ast.Subscript(ast.Name(PLACEHOLDER, ast.Load()), ast.Constant(idx), ast.Load())

    def rewrite(self, node: ast.expr) -> ast.expr:
        if self.is_observed(node):
            return self.observe(node)
        if not isinstance(node, _NODES) or isinstance(node, (ast.Starred, ast.NamedExpr)):
            raise _Unsupported(type(node).__name__)
        if isinstance(node, ast.Name):
            if (node.id in self.consts) != (node.id in self.modules):  # a literal of the tests, math/cmath
                return node
            if node.id in SAFE_BUILTINS and node.id not in self.shadowed | self.consts | self.modules.keys():
                return node
            raise _Unsupported(node.id)
        if isinstance(node, ast.Attribute):
            if (isinstance(node.value, ast.Name) and node.value.id in self.modules and node.attr in SAFE_MATH):
                return node
            raise _Unsupported("attribute")
        if isinstance(node, ast.Dict) and any(k is None for k in node.keys):
            raise _Unsupported("dict unpacking")
        new = _copy(node)
        for name, value in ast.iter_fields(new):
            if isinstance(value, ast.expr):
                setattr(new, name, self.rewrite(value))
            elif isinstance(value, list):
                setattr(new, name, [self.rewrite(v) if isinstance(v, ast.expr) else self._kw(v) for v in value])
        self._check_costly(new)
        return new

    def _kw(self, item: Any) -> Any:
        if isinstance(item, ast.keyword):
            if item.arg is None:
                raise _Unsupported("**kwargs")
            return ast.keyword(item.arg, self.rewrite(item.value))
        return item

    def _check_costly(self, node: ast.AST) -> None:
        has_value = any(isinstance(n, ast.Name) and n.id == PLACEHOLDER for n in ast.walk(node))
        if not has_value:
            return
        if isinstance(node, ast.BinOp) and not isinstance(node.op, _ARITH):
            raise _Unsupported("costly operator on a candidate value")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CONST_ONLY_FUNCS:
            raise _Unsupported("costly function on a candidate value")


class _Rename(ast.NodeTransformer):
    def __init__(self, rename: dict[str, str]):
        self.rename = rename

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.Name(self.rename.get(node.id, node.id), node.ctx)


def _copy(node: ast.AST) -> Any:
    return ast.parse(ast.unparse(node), mode="eval").body if isinstance(node, ast.expr) else node


def _modules_of(stmt: ast.Import | ast.ImportFrom, modules: dict[str, str], other: set[str]) -> None:
    """Record what an import binds: trusted modules (math, cmath) by alias, anything else as 'other'."""
    if isinstance(stmt, ast.Import):
        for a in stmt.names:
            top = a.name.split(".")[0]
            bound = a.asname or top
            if a.name in TRUSTED_MODULES:
                modules[bound] = a.name
            else:
                other.add(bound)
    else:
        for a in stmt.names:
            other.add(a.asname or a.name)


def _statements(tree: ast.Module) -> tuple[list[ast.stmt], dict[str, str]]:
    """The flat statement list and the candidate renames (HumanEval's ``candidate`` -> entry point)."""
    body = list(tree.body)
    checks = {s.name: s for s in body if isinstance(s, ast.FunctionDef)}
    if not checks:
        return body, {}
    if len(checks) != 1:
        raise _Unsupported("several functions")
    fn = next(iter(checks.values()))
    calls = [s for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
             and isinstance(s.value.func, ast.Name) and s.value.func.id == fn.name]
    a = fn.args
    if (len(calls) != 1 or len(a.args) != 1 or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs
            or fn.decorator_list or len(calls[0].value.args) != 1 or calls[0].value.keywords
            or not isinstance(calls[0].value.args[0], ast.Name)):
        raise _Unsupported("check() shape")
    rest = [s for s in body if s is not fn and s is not calls[0]]
    return rest + list(fn.body), {a.args[0].arg: calls[0].value.args[0].id}


def _is_constant(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


@functools.lru_cache(maxsize=8192)
def plan_tests(tests: str, shadowed: frozenset[str] = frozenset()) -> Plan | None:
    """The plan for ``tests``, or None when they need the judge sandbox.  Raises :class:`TestSyntaxError`.

    ``shadowed``: builtin names that the program defines and the tests mean (see :func:`shadowed_builtins`).
    """
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError) as exc:
        raise TestSyntaxError(f"tests do not compile: {exc!r}") from None
    try:
        return _plan(tree, tests, shadowed)
    except (_Unsupported, RecursionError):
        return None


@functools.lru_cache(maxsize=8192)
def _test_names(tests: str) -> tuple[frozenset[str], bool]:
    """(builtin names the tests read and do not import, whether they read any non-builtin free name)."""
    try:
        free = set(free_names(tests, keep_builtins=True))
    except (SyntaxError, ValueError, RecursionError):
        return frozenset(), True
    builtin = {n for n in free if hasattr(builtins, n)}
    return frozenset(builtin), bool(free - builtin)


def shadowed_builtins(program: str, tests: str) -> frozenset[str]:
    """Builtin names the tests must resolve to the program's own definitions.

    In ``exec(program); exec(tests)`` a test's ``sum(10, 15)`` calls the program's ``sum`` when
    the program defines one (MBPP 126 tests a function called ``sum``).  Such names count as the
    candidate's only when the tests name no other function of the candidate: otherwise a
    program could redefine ``sorted`` to control the expected side of ``f(x) == sorted(...)``.
    Only definitions at module level in the program's text count (``def``/``class``/assignments,
    ``global`` declarations); rebinding through ``globals()`` or ``builtins`` changes nothing on
    the trusted side.  The program is only parsed here, never compiled or run.
    """
    used, other = _test_names(tests)
    if other or not used or not any(re.search(rf"\b{n}\b", program) for n in used):
        return frozenset()
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    return frozenset(used & _module_bindings(tree))


@functools.lru_cache(maxsize=1024)
def setup_names(setup: str) -> frozenset[str]:
    """Names a trusted setup binds at module level (HumanEval 32's ``poly``, 38's ``encode_cyclic``).

    The setup is the task's own code that the tests call (the prompt stub's helpers), given apart
    from the candidate's program: tests that read one of these names run in the judge sandbox with
    the setup's definitions, never the candidate's (which may redefine them).  Raises
    :class:`TestSyntaxError` when the setup does not parse.
    """
    if not setup.strip():
        return frozenset()
    try:
        tree = ast.parse(setup)
    except (SyntaxError, ValueError) as exc:
        raise TestSyntaxError(f"trusted setup does not compile: {exc!r}") from None
    return frozenset(_module_bindings(tree))


def _module_bindings(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            out.update(n for g in ast.walk(node) if isinstance(g, ast.Global) for n in g.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            out.add(node.id)
        elif not isinstance(node, ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return out


def _classify_names(stmts: list[ast.stmt]) -> tuple[dict[str, Any], set[str]]:
    """Names the tests bind: to a literal constant only (known here too) or otherwise (the candidate's side)."""
    consts: dict[str, Any] = {}
    other: set[str] = set()
    for s in stmts:
        if isinstance(s, ast.Assign) and all(isinstance(t, ast.Name) for t in s.targets) and _is_constant(s.value):
            for t in s.targets:
                consts[t.id] = ast.literal_eval(s.value)
        elif not isinstance(s, (ast.Assert, ast.Import, ast.ImportFrom)):
            other.update(n.id for n in ast.walk(s) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load))
    for n in other:
        consts.pop(n, None)
    return consts, other


def _plan(tree: ast.Module, tests: str, shadowed: frozenset[str]) -> Plan:
    stmts, rename = _statements(tree)
    consts, cside = _classify_names(stmts)
    imported: set[str] = set()
    # math/cmath used without an import (the program's import would serve in exec(program); exec(tests)):
    # the tests mean the standard modules, never whatever the program binds to those names
    modules = {m: m for m in implicit_modules(tests) if m not in consts and m not in cside}
    steps: list[tuple[str, str]] = [("exec", f"import {m}") for m in modules]
    checks = []
    for s in stmts:
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            _modules_of(s, modules, imported)
            steps.append(("exec", ast.unparse(s)))
        elif isinstance(s, ast.Assert):
            sp = _Splitter(rename, modules, imported, set(consts), cside, steps, shadowed - set(modules) - imported)
            expr = ast.fix_missing_locations(ast.Expression(sp.rewrite(s.test)))
            src = ast.get_source_segment(tests, s) or ast.unparse(s)
            checks.append(Check(compile(expr, "<trusted>", "eval"), src.splitlines()[0][:200], tuple(sp.uses)))
        elif isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)):
            # builds inputs in the candidate's namespace (``root = Node(1)``); its results reach the
            # verdict only through observed calls, and literal constants are also known here
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
                steps.append(("exec", ast.unparse(_Rename(rename).visit(s))))
        elif not isinstance(s, ast.Pass):
            raise _Unsupported(type(s).__name__)
    env = {alias: TRUSTED_MODULES[mod] for alias, mod in modules.items()}
    env.update((k, v) for k, v in consts.items() if k not in env)
    return Plan(tuple(steps), checks=tuple(checks), env=env)


def implicit_modules(tests: str) -> list[str]:
    """Trusted modules (math, cmath) the tests use but never import or bind."""
    bound = set(free_names(tests, keep_builtins=True))
    return sorted(m for m in TRUSTED_MODULES if m in bound)


def free_names(tests: str, keep_builtins: bool = False) -> list[str]:
    """Names the tests read but never bind (and, unless ``keep_builtins``, that are not builtins).
    Raises :class:`TestSyntaxError` for tests that do not parse."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError) as exc:
        raise TestSyntaxError(f"tests do not compile: {exc!r}") from None
    bound, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return sorted(n for n in loaded - bound if keep_builtins or not hasattr(builtins, n))
