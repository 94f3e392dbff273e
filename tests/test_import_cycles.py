"""No import cycle inside ``diffusion_dpo``: the package's imports, read from its source (module-level
and inside functions), form a graph without a loop, so the layering of docs/layout.md holds (a helper
two modules need lives below both, never in one of them)."""

from __future__ import annotations

import ast
from pathlib import Path

import diffusion_dpo

PACKAGE_ROOT = Path(diffusion_dpo.__file__).parent


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` of every module under ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_init = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    # ids of import nodes under ``if TYPE_CHECKING:``, which never run
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` for imports between modules of ``package`` (at ``root``).

    ``from a.b import c`` imports ``a.b.c`` where that is a module, else ``a.b``. Importing a module
    also runs the ``__init__`` of each package above it, so that is an import too, except of a package
    the importer is inside (its own package's ``__init__`` has already started)."""
    modules = _modules(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_init) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_only(tree)
        here = name.split(".") if is_init else name.split(".")[:-1]
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the packages above it, then the module itself
                    module = ".".join(parts[:i])
                    inside = name == module or name.startswith(module + ".")
                    if module in modules and module != name and (i == len(parts) or not inside):
                        edges.setdefault(module, node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One loop ``[a, b, ..., a]`` through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(_loop(graph, set(group)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _loop(graph, group: set[str]) -> list[str]:
    # a shortest path from the group's first module back to itself, inside the group
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return [*paths[v], start]
                if w in group and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected group always has a loop")


def _describe(graph, loop: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(loop, loop[1:])) + f" -> {loop[-1]}"


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT, "diffusion_dpo")
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150  # it read the package
    assert "diffusion_dpo.models.families" in graph["diffusion_dpo.models.loading"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (a helper both sides need belongs below both):\n" + "\n".join(
        _describe(graph, loop) for loop in cycles
    )


def test_the_walk_finds_function_level_relative_and_package_init_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\n\ndef g():\n    return a\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.low import x\n")
    (pkg / "sub" / "low.py").write_text("x = 1\n")
    (pkg / "sub" / "high.py").write_text("from pkg.c import y\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg import a\n\n"
        "def y():\n    from pkg.sub.low import x  # runs pkg/sub/__init__.py first\n    return x\n"
    )
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 2} and graph["pkg.b"] == {"pkg.a": 1}
    assert graph["pkg.c"] == {"pkg.sub": 7, "pkg.sub.low": 7}  # TYPE_CHECKING imports never run
    assert graph["pkg.sub.low"] == {} and graph["pkg.sub"] == {"pkg.sub.low": 1}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]

    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.high import *\n")  # sub -> high -> c -> sub
    cycles = find_cycles(import_graph(pkg, "pkg"))
    assert ["pkg.c", "pkg.sub", "pkg.sub.high", "pkg.c"] in cycles and len(cycles) == 2
