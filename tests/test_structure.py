"""The package's structure: every module imports on its own, and the dependencies that should
run one way do.

Importing a module first (before anything else of tinymeta) is what a user's
``import tinymeta.nn.softmax_xent`` or a spawned worker does; a module that only works when
another was imported before it fails there. The import graph is read from the source with
``ast``: every ``import`` statement counts, at module level or inside a function, because a
lazy import that papers over a cycle still makes the two modules depend on each other.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

import tinymeta
from tinymeta import kernels


def _package_modules() -> dict[str, str]:
    """{module name: source path} for every module of tinymeta, tinymeta.kernels included
    (shipped from the kernels/ folder: wherever it lies, its package says)."""
    roots = [
        ("tinymeta", os.path.dirname(tinymeta.__file__)),
        ("tinymeta.kernels", os.path.dirname(kernels.__file__)),
    ]
    modules = {}
    for prefix, root in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [d for d in subfolders if d != "__pycache__" and d != "kernels"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, f), root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join([prefix, *parts])] = os.path.join(folder, f)
    return modules


MODULES = _package_modules()


def test_the_module_list_is_complete():
    # The walk finds the modules that the other tests rely on, kernels included.
    for name in (
        "tinymeta",
        "tinymeta.tensor",
        "tinymeta.autograd.engine",
        "tinymeta.kernels",
        "tinymeta.kernels.reference",
        "tinymeta.nn.functional",
        "tinymeta.ops.softmax",
    ):
        assert name in MODULES, name  # fmt: skip
    assert len(MODULES) > 50


# --- every module imported first, in a fresh interpreter ------------------------------------

_IMPORT_EACH_FIRST = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    failures, missing = {}, {}
    for name in json.loads(sys.argv[1]):
        for loaded in [m for m in sys.modules if m == "tinymeta" or m.startswith("tinymeta.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("tinymeta"):
                missing[name] = e.name  # an optional third-party dependency
            else:
                failures[name] = traceback.format_exc(limit=-3)
        except Exception:
            failures[name] = traceback.format_exc(limit=-3)
    print(json.dumps({"failures": failures, "missing": missing}))
    """
)


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(MODULES)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failures"] == {}, "\n".join(
        f"{name}:\n{tb}" for name, tb in report["failures"].items()
    )
    # Only optional extras may be missing, and never for the core of the package.
    core = [n for n in report["missing"] if n.startswith(("tinymeta.nn", "tinymeta.ops"))]
    assert core == [], report["missing"]


# --- the import graph -----------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: str) -> set[str]:
    """The tinymeta modules that ``name`` imports anywhere in its source (not under
    ``if TYPE_CHECKING:``), each as the deepest module the statement names."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    named = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .reference import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # "from package import module" names the module
                named.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    deps = set()
    for target in named:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)
    return deps


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reaches(start: str, goal: str) -> list[str] | None:
    """An import chain from ``start`` to ``goal`` (module names), or None. The top package
    ``tinymeta`` is no link of a chain: importing any submodule runs it first, so every module
    would reach every other through it."""
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for m in frontier:
            for dep in sorted(GRAPH[m]):
                if dep not in parents and dep != "tinymeta":
                    parents[dep] = m
                    nxt.append(dep)
        frontier = nxt
    if goal not in parents:
        return None
    chain = [goal]
    while chain[-1] != start:
        chain.append(parents[chain[-1]])
    return chain[::-1]


def test_the_graph_reader_sees_imports_at_every_level(tmp_path):
    # A lazy import inside a function and a relative import both count; TYPE_CHECKING not.
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from tinymeta.ops import shape\n"
        "if TYPE_CHECKING:\n"
        "    from tinymeta.nn import functional\n"
        "def f():\n"
        "    from tinymeta.autograd.engine import backward\n"
        "    from . import reference\n"
    )
    deps = _imports("tinymeta.kernels.fake", str(source))
    assert deps == {"tinymeta.ops.shape", "tinymeta.autograd.engine", "tinymeta.kernels.reference"}
    assert _reaches("tinymeta.autograd.anomaly", "tinymeta.autograd._hooks") is not None


# The pairs issue 16 names: each dependency must run one way (STYLE.md, "One-way
# dependencies"): a chain of imports may lead from one to the other, never back.
ONE_WAY_PAIRS = [
    pytest.param("tinymeta.tensor", "tinymeta.autograd.engine", id="tensor-engine"),
    pytest.param("tinymeta.autograd._hooks", "tinymeta.autograd.anomaly", id="hooks-anomaly"),
    pytest.param("tinymeta.nn.functional", "tinymeta.nn.softmax_xent", id="functional-xent"),
]


@pytest.mark.parametrize("a, b", ONE_WAY_PAIRS)
def test_no_import_cycle_between(a, b):
    there, back = _reaches(a, b), _reaches(b, a)
    assert there is None or back is None, (
        f"import cycle: {' -> '.join(there)} and {' -> '.join(back)}"
    )


def test_kernels_import_nothing_of_tinymeta_outside_them():
    # STYLE.md: kernels/ takes and returns arrays and never imports tinymeta.
    kernel_modules = [
        m for m in GRAPH if m == "tinymeta.kernels" or m.startswith("tinymeta.kernels.")
    ]
    assert len(kernel_modules) >= 3
    outside = {
        m: sorted(d for d in GRAPH[m] if not d.startswith("tinymeta.kernels"))
        for m in kernel_modules
    }
    assert all(not deps for deps in outside.values()), outside


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm,
    iterative): every set of modules that import one another through some chain."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, deps = work[-1]
            dep = next(deps, None)
            if dep is not None:
                if dep not in index:
                    index[dep] = low[dep] = len(index)
                    stack.append(dep)
                    on_stack.add(dep)
                    work.append((dep, iter(sorted(graph[dep]))))
                elif dep in on_stack:
                    low[node] = min(low[node], index[dep])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.add(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _graph_without_the_top_package() -> dict[str, set[str]]:
    # As in _reaches: every module reaches the top package (importing a submodule runs it).
    return {m: deps - {"tinymeta"} for m, deps in GRAPH.items() if m != "tinymeta"}


# The import cycles left in tinymeta, each to be broken (and taken off this list), never
# added to: Tensor.__setitem__ imports ops.shape.setitem and _replace_data function._next_seq
# inside the function, while both modules import tensor.
KNOWN_CYCLES = [{"tinymeta.tensor", "tinymeta.function", "tinymeta.ops.shape"}]


def test_no_import_cycles_but_the_known_ones():
    cycles = _cycles(_graph_without_the_top_package())
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"import cycles (modules that import one another): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"cycles broken since: take them off KNOWN_CYCLES: {gone}"


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
