"""The plugin loads on QGIS 4 (Qt6, PyQt6) as well as on QGIS 3.22 (Qt5): its sources keep none of the Qt5-only
idioms PyQt6 dropped, so a user of QGIS 4 gets the plugin and not a traceback when it loads or when a dialog opens.

Read from the sources' syntax trees (comments and strings do not count), with the names resolved in this QGIS:
- no `.exec_()` (PyQt6 has only `exec()`);
- no enum member reached without its enum (`Qt.UserRole`, `QMessageBox.Yes`, `Qgis.Warning`): PyQt6 and QGIS 4
  only have the scoped form (`Qt.ItemDataRole.UserRole`), which QGIS 3.22 takes too;
- no `QVariant.String`-like types (QGIS 4's QgsField takes QMetaType.Type; PyQt6 has no QVariant.Type);
- QAction not imported from QtWidgets except as the Qt5 fallback of an import from QtGui (where Qt6 has it);
- metadata.txt says supportsQt6=True and a qgisMaximumVersion that takes QGIS 4 (QGIS 4 refuses the plugin else);
- every spacer of the .ui forms has a size (PyQt6's uic cannot build one without: the dock would not open).
"""

from __future__ import annotations

import ast
import configparser
import enum
import importlib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from plugin_helpers import REPO

PLUGIN = REPO / "qgis_farslip"


def _sources(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _qt_names(tree: ast.AST) -> dict[str, object]:
    """Names a module imports from qgis.PyQt.*, qgis.core and qgis.gui, resolved to their objects here."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qgis."):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def _is_enum_member(value: object) -> bool:
    # A sip enum member (an int subclass on PyQt5) or a Python enum member (PyQt6, QGIS's moved enums).
    return isinstance(value, enum.Enum) or (isinstance(value, int) and type(value) not in (int, bool))


def qt5_only_idioms(root: Path) -> list[str]:
    """file:line and what, for each Qt5-only idiom in the Python sources under root."""
    found = []
    for path in _sources(root):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = _qt_names(tree)
        where = path.relative_to(root.parent)
        guarded = {id(node) for handler in ast.walk(tree) if isinstance(handler, ast.ExceptHandler)
                   for node in ast.walk(handler)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "exec_":
                found.append(f"{where}:{node.lineno}: .exec_ (use .exec)")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
                owner = names[node.value.id]
                if node.value.id == "QVariant" and node.attr[:1].isupper():
                    found.append(f"{where}:{node.lineno}: QVariant.{node.attr} (QGIS 4 has no QVariant.Type)")
                elif _is_enum_member(getattr(owner, node.attr, None)):
                    member = getattr(owner, node.attr)
                    scoped = getattr(type(member), "__name__", "?")
                    found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} unscoped "
                                 f"(use {node.value.id}.{scoped}.{node.attr})")
            elif (isinstance(node, ast.ImportFrom) and node.module == "qgis.PyQt.QtWidgets"
                  and any(alias.name == "QAction" for alias in node.names) and id(node) not in guarded):
                found.append(f"{where}:{node.lineno}: QAction from QtWidgets (Qt6 has it in QtGui)")
    return found


def test_the_plugin_sources_keep_no_qt5_only_idiom():
    assert qt5_only_idioms(PLUGIN) == []


def test_the_scan_sees_each_idiom(tmp_path):
    """The scan itself: each idiom in a module is found, its Qt6-ready form is not."""
    package = tmp_path / "package"
    package.mkdir()
    (package / "old.py").write_text(
        "from qgis.core import Qgis, QgsField\n"
        "from qgis.PyQt.QtCore import Qt, QVariant\n"
        "from qgis.PyQt.QtWidgets import QAction, QMessageBox\n"
        "# Qt.UserRole in a comment is no code\n"
        "ROLE = Qt.UserRole\n"
        "LEVEL = Qgis.Warning\n"
        "FIELD = QgsField('name', QVariant.String)\n"
        "def ask(dialog):\n"
        "    return dialog.exec_() == QMessageBox.Yes\n", encoding="utf-8")
    (package / "new.py").write_text(
        "from qgis.core import Qgis\n"
        "from qgis.PyQt.QtCore import Qt\n"
        "from qgis.PyQt.QtWidgets import QMessageBox\n"
        "try:\n"
        "    from qgis.PyQt.QtGui import QAction\n"
        "except ImportError:\n"
        "    from qgis.PyQt.QtWidgets import QAction\n"
        "ROLE = Qt.ItemDataRole.UserRole\n"
        "LEVEL = Qgis.MessageLevel.Warning\n"
        "VERSION = Qgis.QGIS_VERSION_INT\n"
        "def ask(dialog):\n"
        "    return dialog.exec() == QMessageBox.StandardButton.Yes\n", encoding="utf-8")
    found = qt5_only_idioms(package)
    assert all(line.startswith("package/old.py:") for line in found), found
    assert sorted(line.split(": ", 1)[1].split(" ")[0] for line in found) == sorted(
        [".exec_", "QMessageBox.Yes", "QAction", "Qt.UserRole", "Qgis.Warning", "QVariant.String"]), found

def test_metadata_lets_qgis_4_load_the_plugin():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string((REPO / "metadata.txt").read_text(encoding="utf-8"))
    general = parser["general"]
    assert general.get("supportsQt6", "").strip().lower() in ("true", "yes")
    # Without qgisMaximumVersion QGIS takes the minimum's major version + .99: 3.99 would refuse QGIS 4.
    maximum = general.get("qgisMaximumVersion", general["qgisMinimumVersion"].split(".")[0] + ".99")
    assert tuple(int(part) for part in maximum.split(".")) >= (4, 0)


def test_every_spacer_of_the_forms_has_a_size():
    missing = [f"{form.name}: {spacer.get('name')}" for form in sorted((PLUGIN / "ui").glob("*.ui"))
               for spacer in ElementTree.parse(form).iter("spacer")
               if spacer.find("property[@name='sizeHint']/size") is None]
    assert missing == [], "PyQt6's uic cannot build a spacer without a sizeHint"
