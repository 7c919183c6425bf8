"""The packages' import direction: model <- infer <- shards <- train / synth, nothing imports train or
synth, and no package's modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "infer", "shards", "train", "synth")
ALLOWED = {"model": set(), "infer": {"model"}, "shards": {"model", "infer"}, "train": {"model", "infer", "shards"},
           "synth": {"model", "infer", "shards"}}


def imports(path: Path, package: str) -> set[str]:
    """Every project module ``path`` imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package
                base = package if node.level == 1 else ""
                module = f"{base}.{node.module}" if node.module else base
                found |= {f"{module}.{alias.name}" if not node.module else module for alias in node.names}
            elif node.module:
                found.add(node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_imports_flow_one_way_with_no_cycle():
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            found = imports(path, package)
            outside = {m.split(".")[0] for m in found} - {package} - ALLOWED[package]
            assert not outside, f"{name} imports {sorted(outside)}"
            if path.stem != "__init__":
                graph[name] = {m for m in found if m.split(".")[0] == package and not m.endswith("__init__")}
    # no cycle among a package's modules (a package's __init__ re-exporting is not an edge back)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
