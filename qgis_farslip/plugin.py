"""The plugin object QGIS loads: menu and toolbar action, dock, settings, Processing provider, backend."""

from __future__ import annotations

import os

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QMessageBox

try:  # Qt6 (QGIS 4): QAction is in QtGui
    from qgis.PyQt.QtGui import QAction
except ImportError:  # Qt5 (QGIS 3): in QtWidgets
    from qgis.PyQt.QtWidgets import QAction  # type: ignore[no-redef]

from .backend_manager import BackendManager
from .classes import resources_dir
from .processing_provider import FarslipProvider
from .settings import PluginSettings
from .i18n import tr

MENU = "&FarSLIP"
SWITCH_POLL_MS = 500


class FarslipPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.manager: BackendManager | None = None
        self.dock = None
        self.provider: FarslipProvider | None = None
        self.provider_added = False  # tried once (initProcessing, then initGui again in the desktop)
        self.actions = []
        # A backend switch (new settings, a new install) waits for the dock's running jobs to end.
        self.switch_timer = QTimer()
        self.switch_timer.setInterval(SWITCH_POLL_MS)
        self.switch_timer.timeout.connect(self._switch_when_idle)

    def icon(self) -> QIcon:
        root = resources_dir()
        return QIcon(os.path.join(root, "icons", "farslip.svg")) if root else QIcon()

    def initProcessing(self):
        """The Processing provider and the backend manager its algorithms use. QGIS calls this alone where there
        is no GUI (qgis_process) and may call it before initGui in the desktop: the provider is registered once."""
        if self.manager is None:
            self.manager = BackendManager()
        if not self.provider_added:
            self.provider_added = True
            provider = FarslipProvider(lambda: self.manager)
            if QgsApplication.processingRegistry().addProvider(provider):
                self.provider = provider
            # else another copy of the plugin registered "farslip"; the registry deleted ours

    def initGui(self):
        self.initProcessing()
        self.dock_action = QAction(self.icon(), tr("FarSLIP segmentation"), self.iface.mainWindow())
        self.dock_action.setCheckable(True)
        self.dock_action.setToolTip(tr("Segment a raster by typing class names (FarSLIP)"))
        self.dock_action.toggled.connect(self.show_dock)
        self.settings_action = QAction(tr("FarSLIP settings..."), self.iface.mainWindow())
        self.settings_action.triggered.connect(self.show_settings)
        self.iface.addToolBarIcon(self.dock_action)
        for action in (self.dock_action, self.settings_action):
            self.iface.addPluginToMenu(MENU, action)
        self.actions = [self.dock_action, self.settings_action]

    def create_dock(self):
        if self.dock is None:
            from .dock import FarslipDock

            self.dock = FarslipDock(self.iface, self.manager, parent=self.iface.mainWindow())
            self.dock.form.settingsButton.clicked.connect(self.show_settings)
            self.dock.settingsRequested.connect(self.show_settings)
            self.dock.installRequested.connect(self.show_installer)
            self.dock.visibilityChanged.connect(self.dock_action.setChecked)
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        return self.dock

    def show_dock(self, visible: bool = True) -> None:
        dock = self.create_dock()
        dock.setVisible(visible)
        if visible:
            dock.raise_()
            if PluginSettings.load().auto_start and self.manager.state in ("idle", "failed"):
                self.manager.ensure()

    def show_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        dialog = SettingsDialog(PluginSettings.load(), self.iface.mainWindow())
        if dialog.exec():
            before = PluginSettings.load()
            after = dialog.settings()
            after.save()
            backend_changed = (before.backend_command, before.backend_url, before.backend_token,
                               before.connection_file) != (after.backend_command, after.backend_url,
                                                           after.backend_token, after.connection_file)
            if backend_changed and self.manager is not None:
                self.switch_backend()

    def switch_backend(self) -> None:
        """Stop the backend so that the new settings take effect (and start the new one while the dock is open).
        A job running on it (the dock's or a Processing algorithm's) is not cut off as if the backend had
        crashed: the analyst chooses to cancel it now, or the switch waits until it ends."""
        busy = self.running_jobs()
        if busy:
            jobs = ", ".join(busy[:-1]) + (" and " if len(busy) > 1 else "") + busy[-1]
            question = tr("{} is running on the FarSLIP backend. Cancel it and switch to the new backend now? (No: "
                          "the switch waits until it has ended.)") if len(busy) == 1 else tr(
                "{} are running on the FarSLIP backend. Cancel them and switch to the new backend now? (No: the "
                "switch waits until they have ended.)")
            answer = QMessageBox.question(
                self.iface.mainWindow(), tr("Switch the FarSLIP backend?"),
                question.format(jobs[:1].upper() + jobs[1:]),
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
            if answer == QMessageBox.StandardButton.Yes:
                if self.dock is not None:
                    self.dock.cancel_jobs()
                if self.manager is not None:
                    self.manager.cancel_processing_jobs()
        self.switch_timer.start()
        self._switch_when_idle()

    def running_jobs(self) -> list[str]:
        """The jobs running on the backend now, in words: the dock's and the Processing algorithms'."""
        return ((self.dock.running_jobs() if self.dock is not None else []) +
                (self.manager.processing_jobs() if self.manager is not None else []))

    def _switch_when_idle(self) -> None:
        if self.manager is None or self.running_jobs():
            return
        self.switch_timer.stop()
        self.manager.stop()
        if self.dock is not None and self.dock.isVisible():
            self.manager.ensure()

    def show_installer(self) -> None:
        from .installer_dialog import InstallerDialog

        dialog = InstallerDialog(self.iface.mainWindow())
        if dialog.exec() and dialog.installed_command:
            settings = PluginSettings.load()
            settings.backend_command = dialog.installed_command
            settings.save()
            self.switch_backend()

    def unload(self):
        self.switch_timer.stop()
        if self.dock is not None:
            self.dock.close_down()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        for action in self.actions:
            self.iface.removePluginMenu(MENU, action)
            self.iface.removeToolBarIcon(action)
        self.actions = []
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        self.provider_added = False
        if self.manager is not None:
            self.manager.close()
            self.manager.deleteLater()
            self.manager = None
