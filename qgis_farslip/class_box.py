"""The dock's preset combo and class box: presets fill the box, an edited box no longer names a preset."""

from __future__ import annotations

from qgis.PyQt.QtCore import QObject

from .classes import parse_class_text
from .i18n import tr




class ClassBox(QObject):
    def __init__(self, preset_combo, classes_edit, parent=None):
        super().__init__(parent)
        self.combo = preset_combo
        self.edit = classes_edit
        self.presets: dict[str, list[str]] = {}
        preset_combo.activated.connect(self._preset_chosen)
        classes_edit.textChanged.connect(self._edited)

    def class_lines(self) -> list[str]:
        return parse_class_text(self.edit.toPlainText())

    def set_text(self, text: str) -> None:
        self.edit.setPlainText(text)

    def set_presets(self, presets: dict[str, list[str]]) -> None:
        self.presets = dict(presets)
        current = self.combo.currentText()
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem(tr("Custom classes"))
        self.combo.addItems(sorted(self.presets))
        self.combo.setCurrentIndex(max(0, self.combo.findText(current)))
        self.combo.blockSignals(False)

    def preset_name(self) -> str | None:
        """The chosen preset, while the class box still holds exactly its classes."""
        name = self.combo.currentText()
        if name in self.presets and self.class_lines() == parse_class_text("\n".join(self.presets[name])):
            return name
        return None

    def choose_preset(self, name: str) -> bool:
        index = self.combo.findText(name)
        if index < 0:
            return False
        self.combo.setCurrentIndex(index)
        self._preset_chosen(index)
        return True

    def show_preset(self, name: str) -> None:
        """Name the preset in the combo when the box holds its classes (the box is left as it is)."""
        index = self.combo.findText(name)
        if index > 0:
            self.combo.setCurrentIndex(index)
            if self.preset_name() is None:
                self.combo.setCurrentIndex(0)

    def _preset_chosen(self, index: int) -> None:
        name = self.combo.itemText(index)
        if name in self.presets:
            self.edit.blockSignals(True)
            self.edit.setPlainText("\n".join(self.presets[name]))
            self.edit.blockSignals(False)

    def _edited(self) -> None:
        if self.combo.currentIndex() > 0 and self.preset_name() is None:
            self.combo.setCurrentIndex(0)  # the box no longer holds the preset: say so
