"""The house: the import-linter contracts of pyproject.toml hold (each subpackage imports only those below it,
analysis never the trainer or the sweep engine, the sweep and training packages layered inside), and no two
modules import each other, directly or in a longer circle (lazy imports inside functions count too).

The code is read as the installed package is laid out: ``embscale/`` holds the face and every top-level code
folder is one of its subpackages (pyproject's package-dir), which the import graph builder cannot follow on
disk; so the check runs on a code snapshot, the same tree a sweep's jobs import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embscale.sweeps.snapshot import code_snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def package_tree(tmp_path_factory) -> Path:
    return code_snapshot(tmp_path_factory.mktemp("tree"))


def test_import_contracts_hold(package_tree, tmp_path):
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(package_tree)}
    # run outside the checkout: its own embscale/ folder (the face alone) must not shadow the whole package
    result = subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", ""), result.stdout


def import_graph(package_tree: Path) -> dict[str, set[str]]:
    code = ("import json, grimp\n"
            "graph = grimp.build_graph('embscale', cache_dir=None)\n"
            "print(json.dumps({m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}))")
    env = {**os.environ, "PYTHONPATH": str(package_tree)}
    out = subprocess.run([sys.executable, "-c", code], cwd=package_tree, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    import json

    return {module: set(targets) for module, targets in json.loads(out).items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others(package_tree):
    graph = import_graph(package_tree)
    assert {"embscale.models.moe", "embscale.kernels.moe_dispatch", "embscale.sweeps.submit"} <= set(graph)
    assert "embscale.kernels.moe_dispatch" in graph["embscale.models.moe"]  # the graph sees real imports
    assert circles(graph) == []


def test_no_bare_top_level_imports():
    """Code imports the harness as embscale.*, never as a top-level models, kernels, sweeps, ... of the checkout."""
    import ast

    bare = ("models", "kernels", "sweeps", "analysis", "training", "inference", "base", "bench", "commands")
    offenders = []
    for folder in ("embscale", *bare[:-1], "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in bare]
    assert offenders == []
