"""The settings dialog (UI from ui/settings_dialog.ui)."""

from __future__ import annotations

import os

from qgis.PyQt import uic
from qgis.PyQt.QtWidgets import QDialog, QFileDialog

from .settings import PluginSettings, default_output_folder
from .i18n import tr

FORM, _ = uic.loadUiType(os.path.join(os.path.dirname(__file__), "ui", "settings_dialog.ui"))


class SettingsDialog(QDialog, FORM):
    def __init__(self, settings: PluginSettings, parent=None):
        super().__init__(parent)
        self.setupUi(self)
        self.commandEdit.setText(settings.backend_command)
        self.autoStartCheck.setChecked(settings.auto_start)
        self.rayAddressEdit.setText(settings.ray_address)
        self.urlEdit.setText(settings.backend_url)
        self.tokenEdit.setText(settings.backend_token)
        self.connectionFileEdit.setText(settings.connection_file)
        self.defaultModelEdit.setText(settings.default_model)
        self.outputFolderEdit.setText(settings.output_folder)
        self.outputFolderEdit.setPlaceholderText(default_output_folder())
        self.commandBrowse.clicked.connect(self._browse_command)
        self.connectionFileBrowse.clicked.connect(self._browse_connection_file)
        self.outputFolderBrowse.clicked.connect(self._browse_output_folder)

    def settings(self) -> PluginSettings:
        return PluginSettings(
            backend_command=self.commandEdit.text().strip(),
            backend_url=self.urlEdit.text().strip(),
            backend_token=self.tokenEdit.text().strip(),
            connection_file=self.connectionFileEdit.text().strip(),
            auto_start=self.autoStartCheck.isChecked(),
            ray_address=self.rayAddressEdit.text().strip(),
            default_model=self.defaultModelEdit.text().strip(),
            output_folder=self.outputFolderEdit.text().strip(),
        )

    def _browse_command(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, tr("The farslip executable or the backend's Python"),
                                              self.commandEdit.text())
        if path:
            self.commandEdit.setText(path)

    def _browse_connection_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, tr("Connection file written by farslip serve"),
                                              self.connectionFileEdit.text(), "JSON (*.json)")
        if path:
            self.connectionFileEdit.setText(path)

    def _browse_output_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, tr("Folder for FarSLIP results"),
                                                self.outputFolderEdit.text() or default_output_folder())
        if path:
            self.outputFolderEdit.setText(path)
