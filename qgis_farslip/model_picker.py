"""The model row of the dock: the backend's models (missing ones greyed out), Browse..., Download.

A first-time user should never have to type a path: registry models whose
weights are not on this computer are listed but cannot be chosen, and the
Download menu fetches them through the backend; checkpoints and fine-tuned
model folders are picked with a file dialog.
"""

from __future__ import annotations

import json
import os

from qgis.PyQt.QtCore import QObject, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QFileDialog, QMenu, QToolButton

try:  # Qt6 (QGIS 4): QAction is in QtGui
    from qgis.PyQt.QtGui import QAction
except ImportError:  # Qt5 (QGIS 3): in QtWidgets
    from qgis.PyQt.QtWidgets import QAction  # type: ignore[no-redef]
from .i18n import tr

FINETUNED_META = "farslip_model.json"  # written by `farslip train` into a fine-tuned model folder
CHECKPOINT_FILTER = "Checkpoints (*.pt *.pth *.bin *.safetensors *.ckpt);;All files (*)"




def finetuned_class_lines(model: str | None) -> list[str] | None:
    """The classes a fine-tuned model folder was trained on, or None for any other model."""
    if not model or not os.path.isdir(model):
        return None
    try:
        with open(os.path.join(model, FINETUNED_META), encoding="utf-8") as handle:
            lines = json.load(handle).get("class_lines")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(line) for line in lines] if isinstance(lines, list) and lines else None


class ModelPicker(QObject):
    downloadRequested = pyqtSignal(str)  # a registry model's name
    modelChosen = pyqtSignal(str)        # the chosen model (name or path), after a pick or a browse

    def __init__(self, combo, browse_button, download_button, default_model=lambda: "", parent=None):
        super().__init__(parent)
        self.combo = combo
        self.download_button = download_button
        self.default_model = default_model
        self.paths: dict[str, str] = {}  # model name -> folder, for fine-tuned models the backend lists
        browse_menu = QMenu(browse_button)
        browse_menu.addAction(tr("Checkpoint file..."), self.browse_checkpoint)
        browse_menu.addAction(tr("Fine-tuned model folder..."), self.browse_folder)
        browse_button.setMenu(browse_menu)
        browse_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.download_menu = QMenu(download_button)
        download_button.setMenu(self.download_menu)
        download_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        download_button.setEnabled(False)
        combo.activated.connect(lambda _index: self.modelChosen.emit(self.chosen() or ""))

    # -- the list ------------------------------------------------------------------------------------
    def set_models(self, models: dict, wanted: str = "") -> None:
        """Fill the combo from GET /v1/models; keep `wanted` (or the current choice) selected if usable."""
        current = wanted or self.chosen() or ""
        self.combo.clear()
        self.download_menu.clear()
        self.paths = {}
        item_model = self.combo.model()
        first_present = None
        for entry in models.get("models", []):
            name = entry["name"]
            present = entry.get("present", True)
            if entry.get("kind") == "finetuned" and entry.get("path"):
                self.paths[name] = entry["path"]
            label = name + (tr(" (multilingual)") if entry.get("multilingual") else "")
            self.combo.addItem(label if present else tr("{} (not downloaded)").format(label), name)
            item = item_model.item(self.combo.count() - 1)
            languages = ", ".join(entry.get("languages") or ["en"])
            item.setToolTip(tr("{} Class names in: {}.").format(entry.get("description") or name, languages))
            if not present:
                # Listed so the user sees it exists, but not choosable until downloaded.
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEnabled & ~Qt.ItemFlag.ItemIsSelectable)
                action = QAction(name, self.download_menu)
                action.setToolTip(entry.get("description") or "")
                action.triggered.connect(lambda _checked=False, model=name: self.downloadRequested.emit(model))
                self.download_menu.addAction(action)
            elif first_present is None:
                first_present = name
        self.download_button.setEnabled(bool(self.download_menu.actions()))
        for candidate in (current, self.default_model(), models.get("default", ""), first_present):
            if candidate and self.select(candidate):
                return
        self.combo.setCurrentIndex(-1)
        self.combo.setEditText("")
        self.combo.lineEdit().setPlaceholderText(tr("No model on this computer yet: Download or Browse..."))

    def present(self, name: str) -> bool:
        index = self.combo.findData(name)
        return index >= 0 and bool(self.combo.model().item(index).flags() & Qt.ItemFlag.ItemIsEnabled)

    def select(self, model: str) -> bool:
        """Choose a listed (downloaded) model, or put a path in the box; False for a missing model."""
        index = self.combo.findData(model)
        if index >= 0:
            if not self.present(model):
                return False
            self.combo.setCurrentIndex(index)
            return True
        if os.path.sep in model or os.path.exists(model):
            self.combo.setEditText(model)
            return True
        return False

    def chosen(self) -> str | None:
        """The model in the box: a listed model's name, or a typed or browsed path."""
        text = self.combo.currentText().strip()
        index = self.combo.findText(text)
        value = self.combo.itemData(index) if index >= 0 else text
        return value or None

    def chosen_folder(self) -> str | None:
        """The folder of the chosen model when it is a fine-tuned one (listed by name or browsed)."""
        model = self.chosen()
        return self.paths.get(model or "", model)

    # -- browsing ------------------------------------------------------------------------------------
    def browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.combo, tr("Choose a model checkpoint"),
                                              self._start_folder(), tr(CHECKPOINT_FILTER))
        if path:
            self.use_path(path)

    def browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self.combo, tr("Choose a fine-tuned model folder"),
                                                self._start_folder())
        if path:
            self.use_path(path)

    def use_path(self, path: str) -> None:
        self.combo.setEditText(os.path.normpath(path))
        self.modelChosen.emit(self.combo.currentText())

    def _start_folder(self) -> str:
        current = self.chosen() or ""
        return os.path.dirname(current) if os.path.exists(current) else os.path.expanduser("~")
