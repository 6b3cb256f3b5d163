# -*- test-case-name: tests.test_readme_layout -*-
"""README.rst's "Layout" section names every module of the gateway package."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "caracal" / "gateway"


def layout_section(text: str) -> str:
    """The text of README's "Layout" section (up to the next section title)."""
    start = text.index("Layout\n------\n")
    following = re.search(r"\n[^\n]+\n-{3,}\n", text[start + len("Layout\n------\n") :])
    end = start + len("Layout\n------\n") + following.start() if following else len(text)
    return text[start:end]


class LayoutTests(SynchronousTestCase):
    def test_every_module_is_named(self):
        """
        Each module of C{caracal/gateway/} appears as C{``name``} in the
        Layout section, so a module added or renamed is also explained there.
        """
        section = layout_section((ROOT / "README.rst").read_text(encoding="utf-8"))
        modules = sorted(
            path.stem for path in PACKAGE.glob("*.py") if not path.stem.startswith("_")
        )
        missing = [name for name in modules if f"``{name}``" not in section]
        self.assertEqual(missing, [])

    def test_no_module_that_is_gone(self):
        """Every C{``name``} of the Layout's module list is a module that exists."""
        section = layout_section((ROOT / "README.rst").read_text(encoding="utf-8"))
        listed = section.split("``caracal/devsts/``")[0]
        named = set(re.findall(r"``([a-z_]+)``", listed))
        modules = {path.stem for path in PACKAGE.glob("*.py")}
        self.assertEqual(sorted(named - modules), [])
