"""A backend the user started (`farslip serve`) that stops, and is started again: the dock recovers."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import BACKEND_FARSLIP
from plugin_helpers import NAIP, run_dock_job, wait_until
from qgis.core import QgsProject, QgsRasterLayer


def start_serve(connection_file: str, log_path) -> subprocess.Popen:
    """`farslip serve` as a user runs it in a terminal, writing the default connection file."""
    if os.path.exists(connection_file):
        os.remove(connection_file)
    os.makedirs(os.path.dirname(connection_file), exist_ok=True)
    with open(log_path, "a") as log:
        process = subprocess.Popen([str(BACKEND_FARSLIP), "serve", "--host", "127.0.0.1", "--port", "0",
                                    "--connection-file", connection_file], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not os.path.exists(connection_file):
        assert process.poll() is None and time.monotonic() < deadline, open(log_path).read()[-2000:]
        time.sleep(0.2)
    return process


def close(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the user closes the terminal running it
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def external(farslip, backend_home, tmp_path):
    from qgis_farslip.backend_manager import default_connection_file

    processes = []

    def start():
        processes.append(start_serve(default_connection_file(), tmp_path / "serve.log"))
        return processes[-1]

    yield start
    for process in processes:
        close(process)


def test_a_closed_farslip_serve_is_reported_and_reconnected_once_started_again(
        farslip, qgis_iface, plugin_settings, external, tmp_path, tiny_model, qgis_new_project):
    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.client import BackendError
    from qgis_farslip.dock import FarslipDock

    plugin_settings(auto_start=True)
    serve = external()
    manager = BackendManager(connection_file=str(tmp_path / "plugin-backend.json"))
    dock = FarslipDock(qgis_iface, manager)
    try:
        layer = QgsRasterLayer(str(NAIP), "naip")
        QgsProject.instance().addMapLayer(layer)
        dock.form.layerCombo.setLayer(layer)
        dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
        dock.form.classesEdit.setPlainText("water\ngrass")
        dock.form.modelCombo.setEditText(str(tiny_model))
        for check in (dock.form.classRasterCheck, dock.form.probRasterCheck, dock.form.regionChecksCheck):
            check.setChecked(False)
        assert run_dock_job(dock) == "done", dock.last_error
        first_url = manager.connection.url
        assert not manager.owns_process(), "the plugin was to use the user's backend"

        close(serve)
        # The manager still believes it is connected: the Run finds out, says what to do, forgets the backend.
        assert run_dock_job(dock, 60) == "failed"
        status = dock.form.statusLabel.text()
        assert f"The FarSLIP backend at {first_url} is not running" in status, status
        assert "farslip serve" in status and "does not answer" not in status
        links = dock.form.statusMessage.text()
        assert "farslip:reconnect" in links and "farslip:restart" in links and "farslip:log" not in links
        assert manager.state == "failed" and manager.connection is None
        assert dock.form.deviceLabel.text() == "Backend: not available"

        # The next Run (and Processing) look again, and keep saying so while nothing runs: no other backend is
        # swapped in unasked.
        assert run_dock_job(dock, 60) == "failed"
        status = dock.form.statusLabel.text()
        assert status.startswith(f"Not run: the FarSLIP backend at {first_url} is not running"), status
        assert "farslip:reconnect" in dock.form.statusMessage.text()
        assert "is not running" in dock.form.backendMessage.text()
        assert dock.form.backendMessage.isVisibleTo(dock)
        with pytest.raises(BackendError, match="is not running"):
            manager.wait_ready(timeout=30)
        assert not manager.owns_process(), "the plugin started its own backend unasked"

        # The user starts `farslip serve` again (another port): Connect finds it and the next Run works.
        external()
        dock.form.connectButton.click()
        wait_until(lambda: manager.state in ("ready", "failed"), 60, "the reconnect")
        assert manager.state == "ready", manager.message
        assert manager.connection.url != first_url and not manager.owns_process()
        assert dock.form.deviceLabel.text().startswith("Backend: ")
        assert "not" not in dock.form.deviceLabel.text()
        assert run_dock_job(dock) == "done", dock.last_error
    finally:
        dock.close_down()
        manager.stop()
        dock.deleteLater()


def test_connect_checks_that_a_connected_backend_still_answers(
        farslip, qgis_iface, plugin_settings, external, tmp_path, qgis_new_project):
    """ensure() on a manager that says `ready` asks the backend; Reconnect without `farslip serve` running
    again starts the plugin's own backend."""
    from qgis_farslip.backend_manager import BackendManager

    plugin_settings(auto_start=True)
    serve = external()
    manager = BackendManager(connection_file=str(tmp_path / "plugin-backend.json"))
    readies = []
    manager.ready.connect(lambda connection, health: readies.append(connection.url))
    try:
        manager.ensure()
        wait_until(lambda: manager.state in ("ready", "failed"), 60, "the connection")
        assert manager.state == "ready", manager.message
        close(serve)
        manager.ensure()
        wait_until(lambda: manager.state == "failed", 30, "the check")
        assert len(readies) == 1, "ready was sent again for a backend that no longer answers"
        assert "is not running" in manager.message and "farslip:restart" in manager.message

        manager.reconnect()  # Connect, or the message's Reconnect
        wait_until(lambda: manager.state in ("ready", "failed"), 150, "the plugin's own backend")
        assert manager.state == "ready", manager.message
        assert manager.owns_process()
    finally:
        manager.stop()
