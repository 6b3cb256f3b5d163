# -*- test-case-name: tests.test_imports -*-
"""
No import cycles between the gateway's modules, counting the imports hidden
in function bodies: a cycle that only works because one side imports late
is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).parent.parent / "caracal"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """The dotted name of the module at C{path} in C{package}."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of C{package} -> the modules of C{package} it imports anywhere."""
    paths = {module_name(path, package): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in paths and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected groups of more than one module, each sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.add(tuple(sorted(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class ImportCycleTests(SynchronousTestCase):
    """The gateway's import graph has no cycle."""

    def test_finds_a_hidden_cycle(self):
        """A cycle closed by an import inside a function is found."""
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(graph), {("a", "b", "c")})

    def test_no_cycles(self):
        """No group of the gateway's modules imports itself round, even late."""
        self.assertEqual(cycles(import_graph()), set())

    def test_function_level_imports_are_seen(self):
        """The graph includes imports made inside function bodies."""
        package = Path(self.mktemp()) / "pkg"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "early.py").write_text("import pkg.late\n")
        (package / "late.py").write_text("def load():\n    from pkg import early\n")
        graph = import_graph(package)
        self.assertIn("pkg.early", graph["pkg.late"])
        self.assertEqual(cycles(graph), {("pkg.early", "pkg.late")})
