"""The package's import graph: no cycle anywhere in evomerge/, lazy (in-function) imports included.

A cycle hidden behind a lazy import still ties two modules into one unit that cannot be read,
tested or changed alone; the issue that reshaped the wiring made this a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> evomerge modules it imports anywhere in its file (top level or in functions).

    `from a.b import c` counts as importing a.b, or a.b.c when c is a module. The implicit
    import of a parent package (`a` when importing `a.b`) is not an edge: a package's __init__
    importing its own modules is how packages work."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                found = resolve(target)
                if found and found != mod and found.startswith("evomerge"):
                    graph[mod].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_evomerge() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_lazy_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    real = import_graph()
    # study.py imports the plan at the top; the plan module itself is imported lazily by commands
    assert "evomerge.study_plan" in real["evomerge.study"]
    assert "evomerge.study_plan" in real["evomerge.commands.run"]  # an in-function import


def test_study_loop_names_no_plugin() -> None:
    """study.py knows no optimizer, executor, or their state files by name (issue 11)."""
    text = (PACKAGE / "study.py").read_text()
    for name in ("cma", "optuna", "ray", "optimizer.pkl", "optuna.db", "local"):
        assert f'"{name}' not in text and f"'{name}" not in text, name
    assert "evomerge.optimizers." not in text and "evomerge.executors." not in text
