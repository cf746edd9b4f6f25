"""Ctrl+C while `farslip` is still importing its command line: one line and status 130, not a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Ctrl+C comes while torch is being imported (the import hook sends SIGINT to this very process then).
CHILD = r"""
import importlib.abc, os, signal, sys

class CtrlCDuringImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCDuringImport())
sys.argv = ["farslip", "segment", "no-such.tif", "-c", "water"]
from backend.service.launch import main
main()
"""


def test_ctrl_c_while_the_command_line_imports_says_one_line():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 130, (out.returncode, out.stderr[-2000:])
    assert out.stderr.strip() == "Interrupted; nothing was written."
    assert out.stdout == ""


def test_the_console_script_and_the_plugin_start_through_it():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["farslip"] == "backend.service.launch:main"
    source = (REPO / "qgis_farslip" / "backend_manager.py").read_text(encoding="utf-8")
    assert 'CLI_ENTRY = "from backend.service.launch import main; main()"' in source
