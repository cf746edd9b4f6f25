"""docs/ARCHITECTURE.md lists every module of the three layers and the plugin, so the map stays true."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("backend", "training", "qgis_farslip")
# A layer's own __init__.py holds no code worth a line; a sub-package's (backend/service/server/) does.
LAYER_FOLDERS = ("backend", "backend/engine", "backend/scale", "backend/service", "training", "qgis_farslip")


def test_every_module_has_its_line_in_the_architecture_document():
    document = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    modules = [path.relative_to(ROOT).as_posix() for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))]
    missing = [module for module in modules
               if not (module.endswith("/__init__.py") and module.rsplit("/", 1)[0] in LAYER_FOLDERS)
               and module not in document]
    assert not missing, "add a line for each to docs/ARCHITECTURE.md: " + ", ".join(missing)
