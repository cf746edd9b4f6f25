"""Ctrl+C while `farslip` is still importing its command line: one line and status 130, not a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Ctrl+C comes while torch is being imported (the import hook sends SIGINT to this very process then): after the
# checks of the raster and class list, which need no torch, pass.
CHILD = r"""
import importlib.abc, os, signal, sys

class CtrlCDuringImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCDuringImport())
sys.argv = ["farslip", "segment", sys.argv[1], "-c", "water", "--out", sys.argv[2]]
from backend.service.launch import main
main()
"""


def test_ctrl_c_while_the_command_line_imports_says_one_line(tmp_path):
    raster = REPO.parent / "shared" / "data" / "RGB.byte.tif"
    out = subprocess.run([sys.executable, "-c", CHILD, str(raster), str(tmp_path / "out.gpkg")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 130, (out.returncode, out.stderr[-2000:])
    assert out.stderr.strip() == "Interrupted; nothing was written."
    assert out.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_and_the_plugin_start_through_it():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["farslip"] == "backend.service.launch:main"
    source = (REPO / "qgis_farslip" / "backend_manager.py").read_text(encoding="utf-8")
    assert 'CLI_ENTRY = "from backend.service.launch import main; main()"' in source
