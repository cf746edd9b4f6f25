"""Find, start, reuse and stop the FarSLIP backend (`farslip serve`).

The backend is a separate process with its own Python (torch, open_clip,
rasterio); the plugin starts it with QProcess on a free port, learns its URL
and token from the connection file it writes (mode 0600), and stops it when
the plugin unloads. A backend that is already running (the user's own
`farslip serve`, or one the plugin started before) is reused.
"""

from __future__ import annotations

import html
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from qgis.core import Qgis, QgsApplication, QgsMessageLog
from qgis.PyQt.QtCore import (QCoreApplication, QObject, QProcess, QProcessEnvironment, Qt, QThread, QTimer,
                              pyqtSignal)

from .client import BackendClient, BackendError, BackendTokenRefused, Connection
from .i18n import tr
from .installer import FOREIGN_ENV
from .messages import INSTALL, OPEN_LOG, RECONNECT, RESTART, SETTINGS, action_labels, with_actions
from .settings import PluginSettings, backend_home
from .tasks import run_in_background

LOG_TAG = "FarSLIP"
START_TIMEOUT_S = 120.0
STOP_ASK_S = 2.0  # POST /v1/shutdown: the backend answers at once, or it is not listening any more
STOP_WAIT_MS = 8000  # then its graceful end (the running job is cancelled within one batch)
HEALTH_TIMEOUT_S = 2.0  # the check that a connected backend still answers, before it is reported ready
CLI_ENTRY = "from backend.service.launch import main; main()"


def log(message: str, level=Qgis.MessageLevel.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


def plain_text(rich_text: str) -> str:
    """The dock's rich-text messages as plain sentences (for Processing's log and exceptions): the dock's action
    links ("Restart backend · Open log") are left out, where nothing can be clicked, and the first button the
    sentence names says where it is (Processing has no such button)."""
    text = re.sub(r"<a\b[^>]*>.*?</a>", "", rich_text, flags=re.S)
    buttons = "|".join(re.escape(html.escape(label)) for label in action_labels().values())
    text = re.sub(r"<i>(" + buttons + r")</i>", lambda found: found.group(0) + tr(" (in the FarSLIP panel)"), text,
                  count=1)
    text = re.sub(r"<br\s*/?>", "\n", text)
    lines = html.unescape(re.sub(r"<[^>]+>", "", text)).splitlines()
    return "\n".join(line for line in lines if line.strip(" ·")).strip()


def default_connection_file() -> str:
    """Where `farslip serve` writes its connection file by default (the backend's state_dir())."""
    return os.path.join(backend_home(), "backend.json")


def plugin_connection_file() -> str:
    """The connection file of the backend this plugin starts, in the QGIS profile."""
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "farslip", "backend.json")


def _executable_names(name: str) -> list[str]:
    return [name + ".exe", name] if sys.platform == "win32" else [name]


def backend_environment(settings: PluginSettings) -> QProcessEnvironment:
    """The environment of a backend the plugin starts: QGIS's own Python variables removed, and the
    Ray cluster of the settings, on which its segment jobs then run."""
    environment = QProcessEnvironment.systemEnvironment()
    for name in FOREIGN_ENV:
        environment.remove(name)
    environment.insert("PYTHONUNBUFFERED", "1")
    if settings.ray_address.strip():
        environment.insert("FARSLIP_RAY_ADDRESS", settings.ray_address.strip())
    return environment


def _venv_bin(venv: str) -> str:
    return os.path.join(venv, "Scripts" if sys.platform == "win32" else "bin")


def candidate_commands() -> list[str]:
    """Places a `farslip` executable is looked for when the settings name none, most specific first."""
    here = os.path.dirname(os.path.realpath(__file__))
    checkout = os.path.dirname(here)  # a development checkout: qgis_farslip/ beside .venv/
    places = []
    on_path = shutil.which("farslip")
    if on_path:
        places.append(on_path)
    for folder in (_venv_bin(os.path.join(checkout, ".venv")),
                   os.path.join(os.path.expanduser("~"), ".local", "bin"),
                   _venv_bin(os.path.join(os.path.expanduser("~"), ".farslip", "venv"))):
        places.extend(os.path.join(folder, name) for name in _executable_names("farslip"))
    return places


def _is_python(path: str) -> bool:
    return os.path.basename(path).lower().startswith("python")


def unquoted(text: str) -> str:
    """A path as typed or pasted, without the quotes around it (Windows' "Copy as path" adds them)."""
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def setting_command_line(setting: str) -> list[str]:
    """The backend command setting as a program and its arguments. A setting that names an existing file is that
    file whole (a folder with a space, a Windows drive letter: what Browse and "Install backend..." store);
    only otherwise is it split as a command line, each part without its quotes."""
    path = os.path.expanduser(unquoted(setting))
    if os.path.isfile(path):
        return [path]
    try:
        parts = shlex.split(setting, posix=sys.platform != "win32")
    except ValueError:  # an unbalanced quote
        return []
    return [unquoted(part) for part in parts] if sys.platform == "win32" else parts


def backend_command(setting: str) -> list[str] | None:
    """The command line that runs the `farslip` CLI: from the settings, else the first one found.

    The setting is either a `farslip` executable or the Python interpreter of the
    environment the backend is installed in (then `backend.service.cli` is run with it).
    """
    if setting.strip():
        parts = setting_command_line(setting)
        if not parts:
            return None
        program = shutil.which(parts[0]) or parts[0]
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            return None
        if _is_python(program) and len(parts) == 1:
            return [program, "-c", CLI_ENTRY]
        return [program, *parts[1:]]
    for place in candidate_commands():
        if os.path.isfile(place) and os.access(place, os.X_OK):
            return [place]
    return None


def serve_arguments(connection_file: str) -> list[str]:
    """`farslip serve` as the plugin starts it: loopback, a free port, its own connection file, and ended with
    QGIS (a backend left behind by a QGIS that crashed would keep its model in memory)."""
    return ["serve", "--host", "127.0.0.1", "--port", "0", "--connection-file", connection_file,
            "--parent-pid", str(QCoreApplication.applicationPid())]


def install_help(setting: str) -> str:
    """What to install, and how, when no backend can be found (rich text for the dock)."""
    tried = html.escape(setting) if setting.strip() else ", ".join(
        html.escape(place) for place in candidate_commands()[:4]) or "PATH"
    return with_actions(tr(
        "<b>The FarSLIP backend was not found.</b><br>"
        "FarSLIP runs in its own Python environment (with PyTorch) beside QGIS, never in QGIS's own. "
        "<i>Install backend...</i> creates it in <code>~/.farslip/venv</code> from the copy shipped with "
        "this plugin (PyTorch and the other packages come from the Python package index) and starts it. "
        "A backend installed elsewhere is chosen in <i>Settings &rarr; Backend command</i>, "
        "or start one yourself with <code>farslip serve</code> (pip install farslip-qgis): the plugin "
        "connects to it.<br><small>Looked for: {}</small>").format(tried), INSTALL, SETTINGS)


def check_connection(connection: Connection, timeout: float = 3.0) -> dict:
    """The backend's /v1/health, or BackendError."""
    return BackendClient(connection, timeout=timeout).health(timeout=timeout)


def first_healthy(paths: list[str]) -> tuple[Connection, dict, str] | None:
    """The first connection file whose backend answers /v1/health (blocking)."""
    for path in paths:
        if not path or not os.path.isfile(path):
            continue
        try:
            connection = Connection.from_file(path)
            return connection, check_connection(connection), path
        except (OSError, ValueError, BackendError):
            continue
    return None


def wait_for_backend(connection_file: str, timeout: float, is_alive: Callable[[], bool],
                     should_cancel: Callable[[], bool] = lambda: False) -> tuple[Connection, dict]:
    """Block until the started backend wrote its connection file and answers /v1/health."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not should_cancel():
        found = first_healthy([connection_file])
        if found:
            return found[0], found[1]
        if not is_alive():
            raise BackendError("The FarSLIP backend stopped while starting.")
        time.sleep(0.2)
    raise BackendError(f"The FarSLIP backend did not answer within {timeout:.0f} s.")


class BackendManager(QObject):
    """One backend connection for the plugin: reused, connected to, or started and owned."""

    ready = pyqtSignal(object, dict)   # Connection, health
    failed = pyqtSignal(str)           # rich text for the user
    stateChanged = pyqtSignal(str)     # "idle", "starting", "ready", "failed"
    _ensureRequested = pyqtSignal()    # ensure() asked for from another thread
    _lostReported = pyqtSignal(str)    # lost() reported from another thread (Processing)

    def __init__(self, settings_loader: Callable[[], PluginSettings] = PluginSettings.load,
                 connection_file: str | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.settings_loader = settings_loader
        self.connection_file = connection_file or plugin_connection_file()
        self.connection: Connection | None = None
        self.health: dict = {}
        self.state = "idle"
        self.message = ""
        self.process: QProcess | None = None
        self.output_tail: deque = deque(maxlen=40)
        self._started_at = 0.0
        self._poll = QTimer(self)
        self._poll.setInterval(250)
        self._poll.timeout.connect(self._check_started)
        self._checking = False
        self._verifying = False
        self.attempts = 0
        self.lost_url = ""  # a backend the user started that stopped answering (until found again)
        self.connected_from = ""  # the connection file the connection was read from, if any
        self.generation = 0  # stop() counts up: an answer to a look-up made before it is not acted on
        self.closed = False  # the plugin was unloaded: nothing waits for this manager any more
        # Processing algorithms' jobs running on the backend (from QGIS's task threads): what each is, in words,
        # and the flag that cancels it when the analyst switches the backend.
        self._processing_jobs: dict[int, tuple[str, threading.Event]] = {}
        self._processing_lock = threading.Lock()
        self._ensureRequested.connect(self.ensure, Qt.ConnectionType.QueuedConnection)
        self._lostReported.connect(self.lost, Qt.ConnectionType.QueuedConnection)

    # -- state -------------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        self.state = state
        self.stateChanged.emit(state)

    def _succeed(self, connection: Connection, health: dict, how: str, connection_file: str = "") -> None:
        self._poll.stop()
        self.connection, self.health = connection, health
        self.connected_from = connection_file
        self.lost_url = ""
        log(f"Using the FarSLIP backend at {connection.url} ({how}).")
        self._set_state("ready")
        self.ready.emit(connection, health)

    def _fail(self, message: str) -> None:
        self._poll.stop()
        self.message = message
        log(plain_text(message), Qgis.MessageLevel.Warning)
        self._set_state("failed")
        self.failed.emit(message)

    def client(self) -> BackendClient | None:
        return BackendClient(self.connection) if self.connection else None

    def owns_process(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    # -- connecting ----------------------------------------------------------------------------
    def ensure(self) -> None:
        """Get a working connection (asynchronously): emits `ready` or `failed` later.

        A backend connected before is asked for /v1/health first: one that stopped is looked for
        again (the user's `farslip serve` started anew) or, when the plugin started it, restarted.
        """
        if self.state in ("starting",) or self._verifying:
            return
        if self.state == "ready" and self.connection:
            self._verify(self.connection)
            return
        if self.closed:
            return
        settings = self.settings_loader()
        self.attempts += 1
        self._set_state("starting")
        if settings.backend_url.strip() or settings.connection_file.strip():
            self._connect_configured(settings)
            return
        generation = self.generation

        def on_found(found, error):
            if generation != self.generation:
                return  # stopped (or the plugin unloaded) while looking
            if found:
                self._succeed(found[0], found[1], "already running, from " + found[2], found[2])
            elif self.lost_url:
                self._fail(self.not_running_message())
            elif not settings.auto_start:
                self._fail(with_actions(tr("<b>No FarSLIP backend is running.</b><br>Start one with "
                                           "<code>farslip serve</code>, or turn on <i>Start the backend "
                                           "automatically</i> in the FarSLIP settings."), SETTINGS))
            else:
                self._start(settings)

        run_in_background("Looking for a running FarSLIP backend",
                          lambda: first_healthy([self.connection_file, default_connection_file()]), on_found)

    def reconnect(self) -> None:
        """The user's Connect (or Reconnect): like ensure(), and when the user's `farslip serve` that stopped
        is not found again, the plugin starts its own backend (if the settings let it)."""
        if self.state in ("starting",) or self._verifying:
            return
        if self.state == "ready" and self.connection:
            self._verify(self.connection, reconnecting=True)
            return
        self.lost_url = ""
        self.ensure()

    def _verify(self, connection: Connection, reconnecting: bool = False) -> None:
        """Emit `ready` if the connected backend still answers; otherwise forget it and connect again."""
        self._verifying = True

        def on_done(health, error):
            self._verifying = False
            if self.connection is not connection or self.state != "ready":
                return  # stopped or replaced meanwhile; that change emits its own signals
            if error is None:
                self.health = health
                self.ready.emit(connection, health)
                return
            self._forget(connection)
            if reconnecting:
                self.lost_url = ""
            self.state = "idle"  # ensure() announces the new try
            self.ensure()

        run_in_background("Checking the FarSLIP backend",
                          lambda: check_connection(connection, timeout=HEALTH_TIMEOUT_S), on_done)

    def not_running_text(self) -> tuple[str, tuple[str, ...]]:
        """The backend the user started (`farslip serve`) no longer answers: a rich-text sentence, its actions."""
        if self.settings_loader().auto_start:
            return tr("<b>The FarSLIP backend at {} is not running</b>: start <code>farslip serve</code> again and "
                      "press <i>Reconnect</i>, or press <i>Restart backend</i> to let the plugin start its own."
                      ).format(html.escape(self.lost_url)), (RECONNECT, RESTART)
        return tr("<b>The FarSLIP backend at {} is not running</b>: start <code>farslip serve</code> again and "
                  "press <i>Reconnect</i>, or turn on <i>Start the backend automatically</i> in the settings to "
                  "let the plugin start its own.").format(html.escape(self.lost_url)), (RECONNECT, SETTINGS)

    def not_running_message(self) -> str:
        text, actions = self.not_running_text()
        return with_actions(text, *actions)

    def lost(self, url: str = "") -> None:
        """A job or a check found nothing answering at the backend's address: forget that connection.

        The next ensure() looks for the backend again: the plugin's own one is restarted if it does
        not answer; a backend the user started is reported as not running until it is found again.
        """
        connection = self.connection
        if connection is None or (url and connection.url != url.rstrip("/")):
            return
        if self._forget(connection):
            self._fail(self.not_running_message())
        else:
            self._set_state("idle")

    def restarts_own_backend(self) -> bool:
        """Whether the backend in use is the plugin's own (started now or in an earlier session), which the next
        ensure() starts again when it stops answering; a backend the user started is only looked for."""
        return self.process is not None or self.connected_from == self.connection_file

    def close(self) -> None:
        """The plugin unloads: stop the backend it started; whatever waits for this manager gives up."""
        self.closed = True
        self.stop()

    def _forget(self, connection: Connection) -> bool:
        """Drop a connection that does not answer; True if it was a backend the user started."""
        self.connection, self.health = None, {}
        log(f"The FarSLIP backend at {connection.url} does not answer.", Qgis.MessageLevel.Warning)
        if self.restarts_own_backend():
            return False  # ensure() starts it again
        self.lost_url = connection.url
        return True

    def report_lost(self, url: str) -> None:
        """lost(), from any thread (a Processing algorithm's)."""
        self._lostReported.emit(url)

    def _connect_configured(self, settings: PluginSettings) -> None:
        generation = self.generation

        def connect():
            if settings.backend_url.strip():
                connection = Connection(settings.backend_url.strip(), settings.backend_token.strip())
            else:
                connection = Connection.from_file(os.path.expanduser(unquoted(settings.connection_file)))
            return connection, check_connection(connection, timeout=5.0)

        def on_done(result, error):
            if generation != self.generation:
                return  # stopped (or the plugin unloaded) while connecting
            if error is None:
                self._succeed(result[0], result[1], "from the settings")
            elif isinstance(error, BackendTokenRefused):
                self._fail(with_actions(tr("<b>{}</b><br>Copy the token from the running backend's connection "
                                           "file into the settings, or clear the URL and token there to let "
                                           "the plugin start its own backend.").format(html.escape(str(error))),
                                        SETTINGS))
            else:
                where = html.escape(settings.backend_url or settings.connection_file)
                self._fail(with_actions(tr(
                    "<b>The FarSLIP backend set in the settings ({}) does not answer.</b><br>{}<br>Start it with "
                    "<code>farslip serve</code>, or clear the URL and connection file in the settings to let the "
                    "plugin start one.").format(where, html.escape(str(error))), SETTINGS))

        run_in_background("Connecting to the FarSLIP backend", connect, on_done)

    def _start(self, settings: PluginSettings) -> None:
        command = backend_command(settings.backend_command)
        if command is None:
            self._fail(install_help(settings.backend_command))
            return
        self._stop_process()  # the plugin's earlier backend, if it runs but no longer answers
        folder = os.path.dirname(self.connection_file)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if os.path.exists(self.connection_file):
            os.remove(self.connection_file)  # a stale file from a backend that no longer answers
        process = QProcess(self)
        process.setProcessEnvironment(backend_environment(settings))
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._forward_output)
        process.errorOccurred.connect(self._process_error)
        process.finished.connect(self._process_finished)
        arguments = command[1:] + serve_arguments(self.connection_file)
        log("Starting the FarSLIP backend: " + " ".join(shlex.quote(part) for part in [command[0], *arguments]))
        self.output_tail.clear()
        self.process = process
        self._started_at = time.monotonic()
        process.start(command[0], arguments)
        self._poll.start()

    def _forward_output(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self.output_tail.append(line)
                log(line)

    def _startup_failure(self, what: str) -> None:
        tail = "<br>".join(html.escape(line) for line in list(self.output_tail)[-8:])
        self._fail(with_actions(tr("<b>The FarSLIP backend could not be started</b> ({}).<br><small>{}</small><br>"
                                   "See the FarSLIP tab of the log messages panel; check <i>Settings &rarr; "
                                   "Backend command</i>.").format(html.escape(what), tail),
                                RESTART, OPEN_LOG, SETTINGS))

    def _process_error(self, error) -> None:
        if self.state == "starting" and error == QProcess.ProcessError.FailedToStart:
            self._startup_failure(tr("{} could not be run").format(self.process.program()))

    def _process_finished(self, exit_code: int, exit_status) -> None:
        if self.sender() is not None and self.sender() is not self.process:
            return  # a backend replaced since
        self._forward_output()
        if self.state == "starting" and self._poll.isActive():
            self._startup_failure(tr("it exited with code {}").format(exit_code))
            return
        log(f"The FarSLIP backend stopped (exit code {exit_code}).", Qgis.MessageLevel.Warning)
        self.process = None
        if self.state == "ready":
            self.connection = None
            self._set_state("idle")

    def _check_started(self) -> None:
        if self._checking or self.state != "starting":
            return
        if time.monotonic() - self._started_at > START_TIMEOUT_S:
            self.stop()
            self._startup_failure(tr("no answer within {:.0f} s").format(START_TIMEOUT_S))
            return
        if not os.path.isfile(self.connection_file):
            return
        self._checking = True
        generation = self.generation

        def on_done(found, error):
            self._checking = False
            if found and self.state == "starting" and generation == self.generation:
                self._succeed(found[0], found[1], "started by the plugin", self.connection_file)

        run_in_background("Waiting for the FarSLIP backend", lambda: first_healthy([self.connection_file]), on_done)

    # -- stopping ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the backend this plugin started (a backend it only connected to keeps running)."""
        self.generation += 1
        self._poll.stop()
        self._stop_process()
        self.connection = None
        self.lost_url = ""
        self._set_state("idle")

    def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.finished.disconnect(self._process_finished)
            if process.state() != QProcess.ProcessState.NotRunning:
                log("Stopping the FarSLIP backend.")
                # Asked first: on Windows terminate() posts a window message no console program reads, so the
                # backend never shut down cleanly (QGIS froze 5 s, then the process was killed).
                asked = self._ask_to_stop()
                if not (asked and process.waitForFinished(STOP_WAIT_MS)):
                    if sys.platform != "win32":
                        process.terminate()
                    if not process.waitForFinished(5000 if sys.platform != "win32" else 0):
                        process.kill()
                        process.waitForFinished(2000)
            if os.path.exists(self.connection_file):
                os.remove(self.connection_file)

    def _ask_to_stop(self) -> bool:
        """POST /v1/shutdown to the backend this plugin started (a short wait: it may not answer any more); never
        to one the user started, which this manager may be connected to instead."""
        if self.connection is None or self.connected_from != self.connection_file:
            return False
        try:
            BackendClient(self.connection).shutdown(timeout=STOP_ASK_S)
        except BackendError:
            return False
        return True

    # -- for callers outside the GUI thread (Processing) ------------------------------------------
    @contextmanager
    def processing_job(self, what: str) -> Iterator[threading.Event]:
        """Record a Processing algorithm's job on the backend while it runs (`what`: "a segmentation"); the
        event is set when the analyst cancels it to switch the backend."""
        cancelled = threading.Event()
        with self._processing_lock:
            key = id(cancelled)
            self._processing_jobs[key] = (what, cancelled)
        try:
            yield cancelled
        finally:
            with self._processing_lock:
                self._processing_jobs.pop(key, None)

    def processing_jobs(self) -> list[str]:
        """The Processing algorithms' jobs running on the backend now, in words."""
        with self._processing_lock:
            return [what for what, _cancelled in self._processing_jobs.values()]

    def cancel_processing_jobs(self) -> None:
        """Cancel the Processing algorithms' running jobs (each ends as cancelled: nothing of it is written)."""
        with self._processing_lock:
            for _what, cancelled in self._processing_jobs.values():
                cancelled.set()

    def wait_ready(self, timeout: float = START_TIMEOUT_S + 10,
                   should_cancel: Callable[[], bool] = lambda: False) -> Connection:
        """Block until ready; from the GUI thread the event loop keeps running meanwhile."""
        in_gui_thread = QThread.currentThread() == self.thread()
        connection = self.connection
        if self.state == "ready" and connection is not None:
            try:
                check_connection(connection, timeout=HEALTH_TIMEOUT_S)
                return connection
            except BackendError:
                if in_gui_thread:
                    self.lost(connection.url)
                else:
                    self.report_lost(connection.url)
                    deadline = time.monotonic() + 10
                    while self.connection is connection and time.monotonic() < deadline and not should_cancel():
                        time.sleep(0.05)
        attempt = self.attempts + (0 if self.state == "starting" else 1)
        if self.state != "ready":
            if in_gui_thread:
                self.ensure()
            else:
                self._ensureRequested.emit()  # queued to the manager's (GUI) thread
        deadline = time.monotonic() + timeout
        while (self.state != "ready" and (self.attempts < attempt or self.state in ("idle", "starting"))
               and time.monotonic() < deadline and not should_cancel() and not self.closed):
            if in_gui_thread:
                QgsApplication.processEvents()
            time.sleep(0.05)
        if self.state == "ready" and self.connection:
            return self.connection
        if self.closed:
            raise BackendError(tr("The FarSLIP plugin was unloaded while this waited for its backend; nothing was "
                                  "run. Run it again once the plugin is loaded."))
        if self.state == "failed" and self.message:
            raise BackendError(plain_text(self.message))
        raise BackendError(tr("The FarSLIP backend is not ready (still starting after {:.0f} s); see the FarSLIP tab "
                              "of the log messages panel.").format(timeout))
