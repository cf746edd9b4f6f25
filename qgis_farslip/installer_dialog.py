"""The "Install backend..." dialog: choose the folder, the Python and the PyTorch build, watch the log."""

from __future__ import annotations

import os
import shutil

from qgis.PyQt.QtCore import QProcess, QProcessEnvironment, Qt, pyqtSignal
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

from .backend_manager import unquoted
from .i18n import tr
from .installer import (CPU, CUDA, InstallPlan, bundled_wheel, default_venv, find_pythons, has_nvidia_gpu,
                        install_environment)


class InstallerDialog(QDialog):
    finishedWith = pyqtSignal(str)  # "done", "failed" or "cancelled"

    def __init__(self, parent=None, wheel: str | None = None):
        super().__init__(parent)
        self.setWindowTitle(tr("Install the FarSLIP backend"))
        self.resize(640, 420)
        self.wheel = wheel or bundled_wheel()
        self.pip_args: list[str] = []
        self.installed_command = ""
        self.state = ""
        self.process: QProcess | None = None
        self._steps: list = []
        self._created_venv = False

        self.folderWidget = QgsFileWidget(self)
        self.folderWidget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.folderWidget.setDialogTitle(tr("Folder for the backend's environment (a new or empty one)"))
        self.folderWidget.setFilePath(default_venv())
        self.pythonCombo = QComboBox(self)
        self.pythonCombo.setEditable(True)
        for path, version in find_pythons():
            self.pythonCombo.addItem(f"{path} (Python {version[0]}.{version[1]})", path)
        self.torchCombo = QComboBox(self)
        self.torchCombo.addItem(tr("CPU (works everywhere)"), CPU)
        self.torchCombo.addItem(tr("CUDA (NVIDIA GPU)"), CUDA)
        self.torchCombo.setCurrentIndex(1 if has_nvidia_gpu() else 0)
        self.progressBar = QProgressBar(self)
        self.statusLabel = QLabel(self)
        self.statusLabel.setTextFormat(Qt.TextFormat.PlainText)  # paths and pip's sentences, shown as they are
        self.statusLabel.setWordWrap(True)
        self.logView = QPlainTextEdit(self)
        self.logView.setReadOnly(True)
        self.installButton = QPushButton(tr("Install"), self)
        self.cancelButton = QPushButton(tr("Cancel"), self)
        self.closeButton = QPushButton(tr("Close"), self)
        self.installButton.clicked.connect(self.start)
        self.cancelButton.clicked.connect(self.cancel)
        self.closeButton.clicked.connect(self._close)
        self.cancelButton.setEnabled(False)

        form = QFormLayout()
        form.addRow(tr("Install into"), self.folderWidget)
        form.addRow(tr("Python"), self.pythonCombo)
        form.addRow(tr("PyTorch build"), self.torchCombo)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for button in (self.installButton, self.cancelButton, self.closeButton):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.progressBar)
        layout.addWidget(self.statusLabel)
        layout.addWidget(self.logView)
        layout.addLayout(buttons)
        if not self.wheel:
            self._set_status(tr("This copy of the plugin has no backend wheel inside (it was not built with "
                                "`make plugin`); install the backend with `pip install farslip-qgis` instead."))
            self.installButton.setEnabled(False)

    def plan(self) -> InstallPlan:
        python = self.pythonCombo.currentData() or unquoted(self.pythonCombo.currentText())
        return InstallPlan(python=python, venv=os.path.expanduser(unquoted(self.folderWidget.filePath())),
                           wheel=self.wheel or "", torch_build=self.torchCombo.currentData(),
                           pip_args=list(self.pip_args))

    def _set_status(self, text: str) -> None:
        self.statusLabel.setText(text)
        self.logView.appendPlainText(text)

    def start(self) -> None:
        plan = self.plan()
        if not plan.python:
            self._set_status(tr("No Python 3.10 or newer with the venv module was found on this computer; "
                                "install one (python.org, or your system's python3-venv package) and try again."))
            return
        if os.path.exists(plan.venv) and os.listdir(plan.venv):
            self._set_status(tr("{} exists and is not empty; choose another folder or remove it first.")
                             .format(plan.venv))
            return
        self._plan = plan
        self._steps = plan.steps()
        self._created_venv = True
        self.state = "running"
        self.progressBar.setRange(0, len(self._steps))
        self.progressBar.setValue(0)
        for widget in (self.installButton, self.closeButton, self.folderWidget, self.pythonCombo, self.torchCombo):
            widget.setEnabled(False)
        self.cancelButton.setEnabled(True)
        self._next_step()

    def _next_step(self) -> None:
        if not self._steps:
            self._end("done", tr("The FarSLIP backend is installed in {}; the plugin starts it now.")
                      .format(self._plan.venv))
            self.installed_command = self._plan.backend_command()
            return
        description, program, arguments = self._steps.pop(0)
        self._set_status(description + "...")
        process = QProcess(self)
        # QGIS's Python settings must not leak into the new environment: the same cleaning as the Python probe's
        system = QProcessEnvironment.systemEnvironment()
        environment = QProcessEnvironment()
        for name, value in install_environment({name: system.value(name) for name in system.keys()}).items():
            environment.insert(name, value)
        process.setProcessEnvironment(environment)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._step_finished)
        process.errorOccurred.connect(self._process_error)
        self.process = process
        process.start(program, arguments)

    def _read_output(self) -> None:
        if self.process is not None:
            text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace").rstrip()
            if text:
                self.logView.appendPlainText(text)

    def _process_error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.state == "running":
            self._end("failed", tr("{} could not be run.").format(self.process.program()))

    def _step_finished(self, exit_code: int, _status) -> None:
        self._read_output()
        if self.state != "running":
            return
        if exit_code != 0:
            self._end("failed", tr("The step failed (exit code {}); the log above says why. Nothing was "
                                   "changed in QGIS's own Python.").format(exit_code))
            return
        self.progressBar.setValue(self.progressBar.value() + 1)
        self._next_step()

    def cancel(self) -> None:
        if self.state != "running":
            return
        self.state = "cancelling"
        if self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning:
            self.process.kill()
            self.process.waitForFinished(10000)
        self._end("cancelled", tr("Cancelled; the half-made environment was removed."))

    def _end(self, state: str, message: str) -> None:
        self.state = state
        if state != "done" and self._created_venv:
            shutil.rmtree(self._plan.venv, ignore_errors=True)
        self._set_status(message)
        self.cancelButton.setEnabled(False)
        for widget in (self.installButton, self.closeButton, self.folderWidget, self.pythonCombo, self.torchCombo):
            widget.setEnabled(True)
        if state == "done":
            self.installButton.setEnabled(False)
        self.finishedWith.emit(state)

    def _close(self) -> None:
        if self.state == "done":
            self.accept()
        else:
            self.reject()

    def closeEvent(self, event) -> None:
        self.cancel()
        super().closeEvent(event)
