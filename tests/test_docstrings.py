# -*- test-case-name: tests.test_docstrings -*-
"""
Every test method says what it shows, in a docstring (Twisted's rule): the
docstring is what a reader of a failure sees first.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

TESTS = Path(__file__).parent


def undocumented(path: Path) -> list[str]:
    """The test methods of the module at C{path} that have no docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    missing = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if (
                isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                and item.name.startswith("test")
                and ast.get_docstring(item) is None
            ):
                missing.append(f"{node.name}.{item.name} (line {item.lineno})")
    return missing


def all_test_modules() -> list[Path]:
    """Every test module under C{tests/}, integration tests included."""
    return sorted(TESTS.rglob("test_*.py"))


class DocstringTests(SynchronousTestCase):
    """The check itself, and the suite passing it."""

    def test_check_finds_a_missing_docstring(self):
        """L{undocumented} names a test method without a docstring and spares one with."""
        path = Path(self.mktemp())
        path.write_text(
            "class T:\n"
            "    def test_bare(self):\n"
            "        pass\n"
            "\n"
            "    def test_said(self):\n"
            '        """Said."""\n'
            "\n"
            "    def helper(self):\n"
            "        pass\n",
            encoding="utf-8",
        )
        self.assertEqual(undocumented(path), ["T.test_bare (line 2)"])

    def test_every_test_method_has_a_docstring(self):
        """No test method under C{tests/} lacks a docstring."""
        missing = {}
        for path in all_test_modules():
            name = str(path.relative_to(TESTS.parent))
            found = undocumented(path)
            if found:
                missing[name] = found
        self.assertEqual(missing, {}, "test methods without a docstring")
