"""Imports run one way, layer by layer, and no module imports one that imports it:

    kernels  <-  model's core (llama, config, distributed, loading, graph; checkpoints, tokenizers, quant)
             <-  generation  <-  engine  <-  (server, cli, tools)  <-  benchmarks

Read from the source (every import statement, those inside functions included), not from what happens to be
loaded: a circle hidden in a function body is a circle for a reader too. Also: every import of the project goes
through the one import root, ``llama3_triton``; and no test module imports another (a module that skips at import,
test_gguf.py without ``gguf``, would take the importer's tests with it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "model", "benchmarks")
# Layer of each module, by the longest prefix that names it; a module may import its own layer and those below.
LAYERS = {
    "llama3_triton.kernels": 0,
    "llama3_triton.model": 1,
    "llama3_triton.model.generation": 2,
    "llama3_triton.model.engine": 3,
    "llama3_triton.model.server": 4,
    "llama3_triton.model.cli": 4,
    "llama3_triton.model.tools": 4,
    "llama3_triton.benchmarks": 5,
}


def _modules() -> dict[str, Path]:
    files = {}
    for top in FOLDERS:
        for f in (ROOT / top).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files["llama3_triton." + ".".join(parts)] = f
    return files


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(f: Path) -> list:
    names: list = []  # module names, or (module, [module.name ...]) of a from-import
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.module, [f"{node.module}.{a.name}" for a in node.names]))
    return names


def _flat(f: Path) -> list[str]:
    out = []
    for n in _imports(f):
        out += [n] if isinstance(n, str) else [n[0], *n[1]]
    return out


def _graph() -> dict[str, set[str]]:
    files = _modules()
    graph = {}
    for name, f in files.items():
        deps: set[str] = set()
        for n in _imports(f):
            if isinstance(n, str):
                deps.add(n)
            else:  # `from llama3_triton.model import distributed` imports model.distributed, not the package
                module, subs = n
                deps |= set(subs) & files.keys() or {module}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_every_project_import_goes_through_llama3_triton():
    bad = []
    for f in [*_modules().values(), *(ROOT / "tests").rglob("*.py")]:
        for name in _flat(f):
            if name.split(".")[0] in FOLDERS:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, bad


# The exceptions, each a call made on purpose: Llama.generate, the public convenience DESIGN.md names, hands over to
# the generation layer inside the method (nothing of it is imported with the model).
UPWARD = {("llama3_triton.model.llama", "llama3_triton.model.generation.generate")}


def test_layers_import_one_way():
    bad = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if _layer(d) > _layer(m) and (m, d) not in UPWARD and not m.endswith(".__main__")  # a program, not a layer
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


def test_no_test_module_imports_another():
    bad = []
    for f in (ROOT / "tests").rglob("*.py"):
        for name in _flat(f):
            if name.split(".")[-1].startswith("test_") and name.startswith("tests"):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_the_name_kernels_is_hugging_faces_when_it_is_installed():
    """From a checkout (``python -m pytest``) the root is on sys.path and holds a folder named kernels/; this project
    imports it only as llama3_triton.kernels, and ``import kernels`` (transformers' dependency) is theirs."""
    import importlib
    import importlib.metadata
    import sys

    import pytest

    import llama3_triton.kernels as ours

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed here (transformers < 5.25)")
    kernels = importlib.import_module("kernels")  # Hugging Face's package, not ours: by name, not an import line

    assert kernels is not ours and not Path(kernels.__file__).resolve().is_relative_to(ROOT), kernels.__file__
    assert "llama3_triton.kernels" in sys.modules and not hasattr(kernels, "Ops")


def test_every_package_folder_is_in_the_distribution():
    """pyproject.toml lists the packages explicitly (one import root over three folders): a new sub-package left
    out works from a checkout and is missing from every installed wheel."""
    import re

    packages = (ROOT / "pyproject.toml").read_text().split("packages = [")[1].split("]")[0]
    listed = set(re.findall(r'"(llama3_triton[\w.]*)"', packages))
    folders = {
        "llama3_triton." + ".".join(f.parent.relative_to(ROOT).parts)
        for top in FOLDERS
        for f in (ROOT / top).rglob("__init__.py")
    }
    assert folders <= listed, f"sub-packages missing from pyproject.toml's packages: {sorted(folders - listed)}"
