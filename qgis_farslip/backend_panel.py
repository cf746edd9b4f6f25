"""The dock's backend line and banner: device, state, failures with their actions (restart, log, ...)."""

from __future__ import annotations

import os

from qgis.core import Qgis
from qgis.PyQt.QtCore import QObject, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices

from . import messages
from .backend_manager import BackendManager, log
from .client import BackendClient, Connection, device_text
from .settings import backend_log_file
from .tasks import run_in_background
from .i18n import tr




class BackendPanel(QObject):
    listsArrived = pyqtSignal(dict, dict)  # GET /v1/models, GET /v1/presets
    settingsRequested = pyqtSignal()
    installRequested = pyqtSignal()

    def __init__(self, iface, manager: BackendManager, form, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.manager = manager
        self.form = form
        form.connectButton.clicked.connect(lambda: manager.reconnect())
        form.refreshModelsButton.clicked.connect(self.refresh_lists)
        form.backendMessage.linkActivated.connect(self.do_action)
        manager.ready.connect(self._ready)
        manager.failed.connect(self._failed)
        manager.stateChanged.connect(self._state)

    def show_message(self, rich_text: str) -> None:
        self.form.backendMessage.setText(rich_text)
        self.form.backendMessage.setVisible(bool(rich_text))

    def _state(self, state: str) -> None:
        if state == "starting":
            self.show_message("")  # an old failure must not stay up while a new try runs
            self.form.deviceLabel.setText(tr("Backend: starting..."))
        elif state == "idle":
            self.form.deviceLabel.setText(tr("Backend: not connected"))

    def _ready(self, connection: Connection, health: dict) -> None:
        self.show_message("")
        self.form.deviceLabel.setText(tr("Backend: {}").format(device_text(health)))
        self.form.deviceLabel.setToolTip(f"{connection.url}, FarSLIP {health.get('version', '')}")
        self.refresh_lists()

    def _failed(self, message: str) -> None:
        self.form.deviceLabel.setText(tr("Backend: not available"))
        self.show_message(message)

    def do_action(self, action: str) -> None:
        """A link of the banner or status line: restart the backend, open its log, settings, install."""
        if action == messages.RESTART:
            self.manager.stop()
            self.manager.ensure()
        elif action == messages.RECONNECT:
            self.manager.reconnect()
        elif action == messages.OPEN_LOG:
            path = backend_log_file()
            if os.path.isfile(path):
                QDesktopServices.openUrl(QUrl.fromLocalFile(path))
            else:
                self.iface.openMessageLog()
        elif action == messages.SETTINGS:
            self.settingsRequested.emit()
        elif action == messages.INSTALL:
            self.installRequested.emit()

    def refresh_lists(self) -> None:
        """Models and presets from the backend (in the background)."""
        if self.manager.connection is None:
            self.manager.ensure()
            return
        client = BackendClient(self.manager.connection, timeout=10)
        run_in_background("Reading FarSLIP models and presets",
                          lambda: (client.models(), client.presets()), self._lists_arrived)

    def _lists_arrived(self, result, error) -> None:
        if error is not None:
            log(f"Could not read models and presets: {error}", Qgis.MessageLevel.Warning)
            return
        models, presets = result
        self.listsArrived.emit(models, presets or {})
