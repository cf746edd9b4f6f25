"""Finding the backend and talking to it, without starting one."""

from __future__ import annotations

import json
import os
import stat

import pytest


def test_backend_command_takes_a_farslip_executable_or_the_backends_python(farslip, tmp_path):
    from qgis_farslip.backend_manager import CLI_ENTRY, backend_command

    for name in ("farslip", "python3"):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    assert backend_command(str(tmp_path / "farslip")) == [str(tmp_path / "farslip")]
    assert backend_command(str(tmp_path / "python3")) == [str(tmp_path / "python3"), "-c", CLI_ENTRY]
    assert backend_command(str(tmp_path / "missing" / "farslip")) is None


def test_install_help_says_what_to_install_and_where_it_looked(farslip, tmp_path):
    from qgis_farslip.backend_manager import install_help, plain_text

    text = plain_text(install_help(str(tmp_path / "farslip")))
    # The way in is the Install backend... action; a backend elsewhere is chosen in Settings or started by hand.
    assert "Install backend" in text and "~/.farslip/venv" in text and "farslip serve" in text
    assert "pip install farslip-qgis" in text and "Settings" in text
    assert str(tmp_path / "farslip") in text


def test_connection_file_and_unreachable_backend_give_sentences(farslip, tmp_path):
    from qgis_farslip.client import BackendClient, BackendUnreachable, Connection

    path = tmp_path / "backend.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:9/", "port": 9, "token": "t", "pid": 1,
                                "version": "0.1.0"}))
    connection = Connection.from_file(str(path))
    assert connection.url == "http://127.0.0.1:9" and connection.token == "t"
    with pytest.raises(BackendUnreachable, match="does not answer"):
        BackendClient(connection, timeout=2).health()
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a FarSLIP connection file"):
        Connection.from_file(str(path))


def test_default_connection_file_follows_the_backends_state_dir(farslip, monkeypatch, tmp_path):
    from qgis_farslip.backend_manager import default_connection_file

    monkeypatch.setenv("FARSLIP_HOME", str(tmp_path / "home"))
    assert default_connection_file() == os.path.join(str(tmp_path / "home"), "backend.json")
    monkeypatch.delenv("FARSLIP_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_connection_file() == os.path.join(str(tmp_path / "data"), "farslip", "backend.json")


def test_a_started_backend_gets_the_ray_cluster_of_the_settings(farslip):
    from qgis_farslip.backend_manager import backend_environment
    from qgis_farslip.settings import PluginSettings

    on_ray = backend_environment(PluginSettings(ray_address=" ray://head:10001 "))
    assert on_ray.value("FARSLIP_RAY_ADDRESS") == "ray://head:10001"
    assert on_ray.value("PYTHONUNBUFFERED") == "1" and not on_ray.contains("PYTHONHOME")
    here = backend_environment(PluginSettings())
    assert here.value("FARSLIP_RAY_ADDRESS", "") == os.environ.get("FARSLIP_RAY_ADDRESS", "")


def test_plain_text_leaves_out_the_docks_action_links(farslip):
    """Processing's log and exceptions have nothing to click: 'Restart backend · Open log · Settings' was
    printed there as if it were part of the sentence."""
    from qgis_farslip import messages
    from qgis_farslip.backend_manager import plain_text

    rich = messages.with_actions("<b>The FarSLIP backend could not be started</b> (it exited with code 1).",
                                 messages.RESTART, messages.OPEN_LOG)
    assert plain_text(rich) == "The FarSLIP backend could not be started (it exited with code 1)."


def test_processing_is_told_where_the_buttons_a_message_names_are(farslip, plugin_settings):
    """'press Reconnect, or press Restart backend' in Processing's log, which has no such buttons."""
    from qgis_farslip.backend_manager import BackendManager, install_help, plain_text

    plugin_settings(auto_start=True)
    manager = BackendManager()
    manager.lost_url = "http://127.0.0.1:5000"
    text = plain_text(manager.not_running_message())
    assert "press Reconnect (in the FarSLIP panel), or press Restart backend" in text
    assert "Install backend... (in the FarSLIP panel) creates it" in plain_text(install_help(""))


def test_what_answers_that_is_not_a_farslip_backend_is_said_so(farslip):
    """A backend URL pointing at another web server showed Python's 'Expecting value: line 1 column 1 (char 0)'."""
    import http.server
    import threading

    from qgis_farslip.client import BackendClient, BackendError, Connection

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body>a router's page</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(BackendError) as refused:
            BackendClient(Connection(url, "t"), timeout=5).health()
    finally:
        server.shutdown()
        server.server_close()
    assert str(refused.value) == (f"What answers at {url} is not a FarSLIP backend (its answer to /v1/health is "
                                  "not JSON): check the backend's URL and port.")


def test_the_threshold_offered_stays_below_1_which_the_backend_refuses(bare_dock, qgis_processing):
    """Threshold 1.0 was accepted by the dock and Processing, then refused by the backend in its API's words."""
    from qgis_farslip.processing_provider import SegmentByClassNames

    bare_dock.form.thresholdSpin.setValue(1.0)
    assert bare_dock.form.thresholdSpin.value() == pytest.approx(0.99)
    algorithm = SegmentByClassNames(lambda: None)
    algorithm.initAlgorithm()
    assert algorithm.parameterDefinition("THRESHOLD").maximum() == pytest.approx(0.99)
