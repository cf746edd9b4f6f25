"""Finding and reaching the backend as users' computers have it: installed in a folder with a space in its name
(C:\\Users\\Jane Doe), the setting pasted with quotes, a system proxy for the web that cannot reach 127.0.0.1,
and QGIS's own Python variables in the environment the installer's Python probe inherits.

The backend here is a small stand-in (`farslip serve`'s connection file and /v1/health, standard library only):
what is tested is how the plugin finds, starts and asks it, not the backend itself."""

from __future__ import annotations

import json
import os
import stat
import sys
import urllib.request
from pathlib import Path

import pytest
from plugin_helpers import wait_until

DEAD_PROXY = "http://127.0.0.1:9"  # a proxy that is not there: a request sent through it fails

STAND_IN = '''#!{python}
"""A stand-in for `farslip serve`: writes its connection file, answers /v1/health with the token; POST
/v1/shutdown ends it (a record of that is left beside it); with STAND_IN_DEAF_TO_SIGTERM set it ignores
SIGTERM, as a console program on Windows does not see QProcess.terminate()."""
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer

if os.environ.get("STAND_IN_DEAF_TO_SIGTERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

arguments = sys.argv[1:]
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "arguments.json"), "w") as record:
    json.dump(arguments, record)
connection_file = arguments[arguments.index("--connection-file") + 1]


class Handler(BaseHTTPRequestHandler):
    def answer(self):
        authorised = self.headers.get("Authorization") == "Bearer stand-in-token"
        if authorised and self.command == "POST" and self.path == "/v1/shutdown":
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "asked-to-stop"), "w"):
                pass
            threading.Thread(target=server.shutdown).start()
            self.path = "/v1/health"  # answered like health: 2xx and JSON
        status, body = ((200, {{"status": "ok", "version": "stand-in"}}) if authorised and self.path == "/v1/health"
                        else (404, {{"detail": "no such route"}}) if authorised else (401, {{"detail": "token"}}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
draft = connection_file + ".draft"
with open(draft, "w") as handle:
    json.dump({{"url": "http://127.0.0.1:%d" % server.server_port, "token": "stand-in-token", "pid": os.getpid()}},
              handle)
os.replace(draft, connection_file)
server.serve_forever()
'''


@pytest.fixture
def stand_in(tmp_path) -> Path:
    """A `farslip` executable in a venv under a folder whose name has a space."""
    folder = tmp_path / "Jane Doe" / ".farslip" / "venv" / "bin"
    folder.mkdir(parents=True)
    program = folder / "farslip"
    program.write_text(STAND_IN.format(python=sys.executable), encoding="utf-8")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program


@pytest.fixture
def manager(farslip, tmp_path, monkeypatch):
    """A backend manager whose own connection file is in this test's folder; no other backend is found."""
    from qgis_farslip.backend_manager import BackendManager

    monkeypatch.setenv("FARSLIP_HOME", str(tmp_path / "state"))
    folder = tmp_path / "profile"
    folder.mkdir()
    created = BackendManager(connection_file=str(folder / "backend.json"))
    yield created
    created.close()


def start(manager) -> None:
    manager.ensure()
    wait_until(lambda: manager.state in ("ready", "failed"), 30, "the backend to start or fail")


@pytest.mark.parametrize("quoting", ["{}", '"{}"', "'{}'", '  "{}"  '])
def test_a_backend_installed_in_a_folder_with_a_space_is_started(manager, stand_in, plugin_settings, quoting):
    """What "Install backend..." and the Browse button store (the path as it is), or the path pasted with quotes
    (Windows' "Copy as path"): the plugin found no backend ("was not found") though the file was there."""
    plugin_settings(backend_command=quoting.format(stand_in), auto_start=True)
    start(manager)
    assert manager.state == "ready", manager.message
    assert manager.health["version"] == "stand-in"
    arguments = json.loads((stand_in.parent / "arguments.json").read_text())
    assert arguments[:1] == ["serve"] and "--connection-file" in arguments
    manager.stop()
    assert manager.process is None and not os.path.exists(manager.connection_file)


def test_a_python_in_a_folder_with_a_space_runs_the_backend_module(farslip, stand_in):
    from qgis_farslip.backend_manager import CLI_ENTRY, backend_command

    python = stand_in.parent / "python3"
    python.symlink_to(sys.executable)
    assert backend_command(str(python)) == [str(python), "-c", CLI_ENTRY]
    assert backend_command(f'"{python}"') == [str(python), "-c", CLI_ENTRY]
    # a command line with arguments is still split (its program quoted where it has a space)
    assert backend_command(f'"{stand_in}" --log-level debug') == [str(stand_in), "--log-level", "debug"]
    assert backend_command(str(stand_in.parent / "no such farslip")) is None


def test_windows_settings_keep_their_drive_letter_and_lose_their_quotes(farslip, monkeypatch):
    from qgis_farslip import backend_manager

    monkeypatch.setattr(sys, "platform", "win32")
    assert backend_manager.setting_command_line(r'"C:\Program Files\FarSLIP\Scripts\farslip.exe" --log-level debug') \
        == [r"C:\Program Files\FarSLIP\Scripts\farslip.exe", "--log-level", "debug"]
    assert backend_manager.setting_command_line(r"C:\Users\Jane\farslip.exe") == [r"C:\Users\Jane\farslip.exe"]


@pytest.fixture
def dead_proxy(monkeypatch):
    """The system names a web proxy (a company's), with no exception for this computer's addresses."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    # as in a QGIS started with them: urllib's shared opener reads the proxies once, when it is first used
    monkeypatch.setattr(urllib.request, "_opener", None)


def test_the_backend_on_this_computer_is_asked_directly_not_through_the_system_proxy(
        manager, stand_in, plugin_settings, dead_proxy):
    """Every request went through the proxy, which cannot reach 127.0.0.1: the backend the plugin had started
    never answered (the start gave up after 120 s) and a running one was reported as not answering."""
    from qgis_farslip.client import BackendClient, BackendRefused, Connection

    plugin_settings(backend_command=str(stand_in), auto_start=True)
    start(manager)
    assert manager.state == "ready", manager.message
    client = manager.client()
    assert client.health()["status"] == "ok"
    with pytest.raises(BackendRefused):  # a POST and a DELETE reach it too (and are refused by the stand-in)
        client.submit("segment", {})
    with pytest.raises(BackendRefused):
        client.cancel("job")
    port = client.connection.url.rsplit(":", 1)[1]
    assert BackendClient(Connection(f"http://localhost:{port}", "stand-in-token")).health()["status"] == "ok"
    # the same backend named by URL and token in the settings (the user's own `farslip serve`)
    plugin_settings(backend_url=client.connection.url, backend_token="stand-in-token")
    by_url = manager.__class__(connection_file=manager.connection_file + ".other")
    try:
        start(by_url)
        assert by_url.state == "ready", by_url.message
    finally:
        by_url.close()


def test_the_installers_python_probe_ignores_qgis_own_python_variables(farslip, monkeypatch, tmp_path):
    """QGIS's launchers set PYTHONHOME and PYTHONPATH for QGIS's own Python; the probe ran each candidate with
    them, every one failed to start, and the dialog offered no Python at all."""
    from qgis_farslip import installer

    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "qgis" / "apps" / "Python39"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "qgis" / "python"))
    assert installer.python_version(sys.executable) == sys.version_info[:2]
    assert installer.find_pythons()


def test_the_probe_runs_with_the_install_steps_environment_and_no_console_on_windows(farslip, monkeypatch):
    from qgis_farslip import installer

    runs = []

    class Finished:
        stdout = "3.12\n"

    def run(command, **options):
        runs.append(options)
        return Finished()

    monkeypatch.setenv("PYTHONHOME", "/qgis/apps/Python39")
    monkeypatch.setenv("VIRTUAL_ENV", "/qgis/venv")
    monkeypatch.setattr(installer.subprocess, "run", run)
    monkeypatch.setattr(sys, "platform", "win32")
    assert installer.python_version("python") == (3, 12)
    assert runs[0]["creationflags"] == 0x08000000  # CREATE_NO_WINDOW: no console flashes up per candidate
    assert runs[0]["env"] == installer.install_environment(os.environ)
    assert not {"PYTHONHOME", "VIRTUAL_ENV"} & set(runs[0]["env"])


def test_the_plugin_asks_its_backend_to_stop_before_it_ends_the_process(
        manager, stand_in, plugin_settings, monkeypatch):
    """On Windows QProcess.terminate() posts a window message a console program never reads: the plugin froze
    QGIS 5 s at each stop and then killed the backend, whose own shutdown (jobs marked, files cleaned) never ran."""
    monkeypatch.setenv("STAND_IN_DEAF_TO_SIGTERM", "1")
    plugin_settings(backend_command=str(stand_in), auto_start=True)
    start(manager)
    assert manager.state == "ready", manager.message
    process = manager.process
    manager.stop()
    assert (stand_in.parent / "asked-to-stop").exists()
    assert process.exitStatus() == process.NormalExit and process.exitCode() == 0  # not killed
