"""Imports run one way: kernels <- model <- (cli, explain, benchmarks), and no module imports one that imports it.

Read from the source (every import statement, those inside functions included), not from what happens to be
loaded: a circle hidden in a function body is a circle for a reader too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "model", "benchmarks")
# The packages each one may import. model.cli, model.explain and the benchmarks are leaves that use the model;
# the CLI starts the benchmark runner as a program (python -m benchmarks), it does not import it.
ALLOWED = {"kernels": {"kernels"}, "model": {"kernels", "model"}, "benchmarks": {"kernels", "model", "benchmarks"}}


def _graph() -> dict[str, set[str]]:
    files = {
        (f"{pkg}.{f.stem}" if f.stem != "__init__" else pkg): f for pkg in PACKAGES for f in (ROOT / pkg).glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                deps |= subs or {node.module}  # `from model import distributed` imports model.distributed
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_packages_import_one_way():
    bad = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if d.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert not bad, bad


def test_no_import_circles():
    graph = _graph()
    circles = []
    for start in graph:  # a depth-first search from each module for a path back to it
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for d in graph[node]:
                if d == start:
                    circles.append(" -> ".join([*path, d]))
                elif d not in seen:
                    seen.add(d)
                    stack.append((d, [*path, d]))
    assert not circles, sorted(set(circles))[:5]
