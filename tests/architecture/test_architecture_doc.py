"""docs/ARCHITECTURE.md lists every module of the three layers and the plugin, so the map stays true."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("backend", "backend/engine", "backend/service", "training", "qgis_farslip")


def test_every_module_has_its_line_in_the_architecture_document():
    document = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [f"{folder}/{path.name}" for folder in FOLDERS for path in sorted((ROOT / folder).glob("*.py"))
               if path.name != "__init__.py" and f"{folder}/{path.name}" not in document]
    assert not missing, "add a line for each to docs/ARCHITECTURE.md: " + ", ".join(missing)
