"""Imports run one way: no cycle among the modules of splitrpc, bench and plots, and none between bench and plots.

Read from the source with ``ast``, every import counts, also one inside a function (a cycle that only
closes at call time is still a cycle: the two modules cannot be understood, or moved, one without the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("splitrpc", "bench", "plots")
ALLOWED_CYCLES: list[set[str]] = []


def modules(root: Path = REPO) -> dict[str, Path]:
    """{dotted name: file} of every module of PACKAGES under ``root`` (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # "from package import module" imports the module; "from module import name" the module.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # The module itself, else the nearest enclosing module we know (importing a.b.c runs a.b).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph(root: Path = REPO) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. every import cycle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_edges(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a.split(".")[0], b.split(".")[0]) for a, targets in edges.items() for b in targets
            if a.split(".")[0] != b.split(".")[0]}


def test_the_graph_sees_function_level_and_package_imports():
    edges = graph()
    assert "splitrpc.methods" in edges["splitrpc.launch"]  # an import inside a function
    assert "splitrpc.privacy.dcor" in edges["splitrpc.split.hospital"]  # from a package's module
    assert "splitrpc.dedup.removal" in edges["splitrpc.dedup.hmac_tokens"]


def test_no_import_cycle_among_modules():
    found = cycles(graph())
    unexpected = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"


def test_bench_and_plots_import_one_way():
    edges = package_edges(graph())
    assert ("bench", "plots") not in edges or ("plots", "bench") not in edges, "bench and plots import each other"
    assert ("bench", "plots") not in edges, "bench imports plots: figures draw bench's results, not the reverse"
    assert not {("splitrpc", "bench"), ("splitrpc", "plots")} & edges, "the library imports bench or plots"


def test_a_cycle_is_found(tmp_path):
    """The check itself: a function-level import that closes a loop is reported."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "plots").mkdir()
    (tmp_path / "splitrpc").mkdir()
    for package in PACKAGES:
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "bench" / "a.py").write_text("def f():\n    from plots.b import g\n    return g\n")
    (tmp_path / "plots" / "b.py").write_text("from bench import a\n\ndef g():\n    return a\n")
    edges = graph(tmp_path)
    assert cycles(edges) == [{"bench.a", "plots.b"}]
    assert {("bench", "plots"), ("plots", "bench")} <= package_edges(edges)
