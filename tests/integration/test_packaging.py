# -*- test-case-name: tests.integration.test_packaging -*-
"""
twistd finds plugins by scanning sys.path for twisted/plugins/ directories,
so both ways of installing the project must leave one it can see: a regular
install (what operators do) and an editable one (what developers do).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
import venv

from twisted.trial.unittest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", ".demo", "_trial_temp*", "build", "dist", "*.egg-info", "__pycache__"
)


class PluginInstallTests(TestCase):
    timeout = 240

    def install(self, *pip_arguments: str) -> str:
        """
        Install a copy of the repository into a new venv (dependencies are
        borrowed from this interpreter's site-packages, so nothing is
        downloaded but the build backend); return the venv's python.
        """
        work = tempfile.mkdtemp(prefix="caracal-pkg-")
        self.addCleanup(shutil.rmtree, work, True)
        source = os.path.join(work, "src")
        shutil.copytree(REPO, source, ignore=IGNORED)
        target = os.path.join(work, "venv")
        venv.create(target, with_pip=False)
        python = os.path.join(target, "bin", "python")
        purelib = subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
        with open(os.path.join(purelib, "zz_borrowed_dependencies.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                python,
                "install",
                "--quiet",
                "--no-deps",
                *pip_arguments,
                source,
            ],
            check=True,
            capture_output=True,
            cwd=work,
        )
        return python

    def plugins_listed(self, python: str) -> str:
        # From / so the checkout on the current directory cannot help.
        result = subprocess.run(
            [python, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            capture_output=True,
            text=True,
            cwd="/",
            check=True,
        )
        return result.stdout

    def test_regularInstall(self):
        """A regular install ships both twistd plugins."""
        listed = self.plugins_listed(self.install())
        self.assertIn("caracal-gateway", listed)
        self.assertIn("caracal-devsts", listed)

    def test_editableInstall(self):
        """A compat editable install exposes both twistd plugins."""
        listed = self.plugins_listed(self.install("-e"))
        self.assertIn("caracal-gateway", listed)
        self.assertIn("caracal-devsts", listed)
