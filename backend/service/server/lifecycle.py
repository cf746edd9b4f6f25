"""The backend process: state folder and its lock, logging, listening socket, connection file, shutdown.

`serve` runs until SIGTERM/SIGINT; a shutdown that hangs (a request stuck in a system call) ends
the process after SHUTDOWN_LIMIT_S regardless, and the connection file is removed either way.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend import __version__
from backend.engine.atomic import write_text_atomically
from backend.engine.errors import FarslipError, InputError
from backend.engine.files import refuse_folder_name
from backend.service.jobs import JobStore

from .app import FEATURE_CACHE_MB, create_app
from .security import check_token

log = logging.getLogger("farslip.server")


class PrivateLogFile(logging.handlers.RotatingFileHandler):
    """A rotating log readable by the user only: it names the user's files and places (as the job history
    does), so each file it opens, a rolled-over one included, is made mode 0600, one written before too."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, where a file has no such mode bits
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def refuse_misplaced(path: Path, what: str, folder: bool) -> None:
    """A file where the state folder keeps a folder (or the other way round) is refused in one sentence naming
    it; it is never removed (it may be the user's)."""
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{path}, where the state folder keeps {what}, is a file, not a folder; move it away, or "
                         "give the backend another --state-dir.")
    if not folder and (path.is_dir() or (path.exists() and not path.is_file())):
        kind = "a folder" if path.is_dir() else "not a plain file"
        raise InputError(f"{path}, where the state folder keeps {what}, is {kind}; move it away, or give the "
                         "backend another --state-dir.")


def prepare_state_dir(state_dir: Path) -> None:
    """The state folder exists (made readable by the user only: the job history names the user's files) and
    is a folder; else one sentence."""
    if state_dir.exists() and not state_dir.is_dir():
        raise InputError(f"The state folder {state_dir} is a file, not a folder; give --state-dir a folder.")
    if not state_dir.exists():
        try:
            state_dir.mkdir(parents=True, mode=0o700)
        except OSError as error:
            raise InputError(f"Cannot make the state folder {state_dir} ({error.strerror or error}); give "
                             "--state-dir a folder this user may write to.") from None


def setup_logging(state_dir: Path, level: str = "INFO") -> Path:
    """Log to a rotating file in the state directory (readable by the user only) and to stderr; returns
    the file's path."""
    log_dir = state_dir / "logs"
    log_file = log_dir / "backend.log"
    refuse_misplaced(log_dir, "the backend's log folder", folder=True)
    refuse_misplaced(log_file, "the backend's log", folder=False)
    try:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_dir.chmod(0o700)  # made by an earlier version, or under a state folder that existed before
        file_handler = PrivateLogFile(log_file, maxBytes=5 * 2**20, backupCount=3, encoding="utf-8")
    except OSError as error:
        raise InputError(f"Cannot write the backend's log {log_file} ({error.strerror or error}); give --state-dir "
                         "a folder this user may write to.") from None
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr_handler = logging.StreamHandler(sys.stderr)
    for logger_name in ("farslip", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(logger_name)
        logger.setLevel(level)
        logger.propagate = False
        for handler in (file_handler, stderr_handler):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    return log_file


def write_connection_file(path: Path, info: dict) -> None:
    """Write the URL + token JSON readable by the user only (mode 0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(info, indent=2), mode=0o600)


def check_connection_file_location(path: Path) -> None:
    """Refuse, before anything binds, a connection file that cannot be written there (a folder, a path
    under a regular file, /sys or /proc): found only after startup, it left a half-started server. Folders
    made for it are removed again when the check fails; nothing else is written."""
    made: list[Path] = []
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        missing = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}."):
            pass
    except OSError as error:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise InputError(f"Cannot write the connection file {path} ({error.strerror or error}); give "
                         "--connection-file a file path in a folder this user may write to.") from None


def backend_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether an HTTP server answers on a connection file's URL (any HTTP answer counts: a backend answers
    GET /v1/health with 200 for its token, 401 for another)."""
    import http.client
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            return False
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            connection.request("GET", "/v1/health")
            connection.getresponse()
        finally:
            connection.close()
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return True


CONNECTION_KEYS = ("url", "port", "token", "pid")


def connection_file_info(path: Path) -> dict | None:
    """A FarSLIP connection file's JSON (an object with url, port, token and a whole-number pid); None when there
    is no file at `path`. Anything else there (not JSON, an empty file, other JSON) is not ours: refused in one
    sentence and left as it is (the user's file; ours is written atomically, so never empty or cut short)."""
    if not path.exists() or path.is_dir():  # a folder there: check_connection_file_location says so
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnicodeDecodeError:
        text = ""
    except OSError as error:
        raise InputError(f"The connection file {path} exists and cannot be read ({error.strerror or error}), so it "
                         "is left as it is; give --connection-file another path.") from None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if (isinstance(info, dict) and all(key in info for key in CONNECTION_KEYS)
            and isinstance(info["pid"], int) and not isinstance(info["pid"], bool) and info["pid"] > 0):
        return info
    raise InputError(f"The connection file {path} exists and is not a FarSLIP connection file (a JSON object with "
                     f"{', '.join(CONNECTION_KEYS)}), so it is left as it is; give --connection-file another path.")


def refuse_taken_connection_file(path: Path) -> None:
    """Another running backend's connection file is not ours to replace (its clients would lose it). A file
    whose process is gone, or whose URL nothing answers on (the pid reused after a reboot or kill -9), is
    stale and replaced. A file that is not a connection file is refused (`connection_file_info`)."""
    from backend.engine.temporary import process_is_alive

    info = connection_file_info(path)
    if info is None:
        return
    pid = int(info["pid"])
    url = str(info.get("url", ""))
    if pid == os.getpid() or not process_is_alive(pid):
        return
    if not backend_answers(url):
        log.info("replacing the stale connection file %s: process %d is running but nothing answers on %s",
                 path, pid, url)
        return
    raise InputError(f"The connection file {path} belongs to a backend that is running (process {pid}, {url}); "
                     "stop that one first, or give this one its own --connection-file.")


def remove_connection_file(path: Path, pid: int) -> None:
    """Remove the connection file if it is still ours (another backend may have replaced it)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


HOST_ADVICE = "Give --host an address of this machine (127.0.0.1, the default, or 0.0.0.0 for every one)."


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind ourselves so that port 0 gives a real, known port before the server starts."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise InputError(f"Cannot listen on {host}: {reason}. {HOST_ADVICE}") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only sets TCP_NODELAY on sockets that do, and without it every
    # keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(error, socket.gaierror):
            advice = HOST_ADVICE
        else:
            advice = "Choose another --port (0 picks a free one)."
        raise InputError(f"Cannot listen on {host}:{port}: {error.strerror or error}. {advice}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def listens_beyond_loopback(sock: socket.socket) -> bool:
    """Whether the bound address is reachable from other machines (not 127.x or ::1)."""
    try:
        return not ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback
    except ValueError:
        return True


def _lock_state_dir(state_dir: Path):
    """Only one backend per state directory: a second would mark the first one's jobs interrupted."""
    lock_path = state_dir / "backend.lock"
    refuse_misplaced(lock_path, "the lock that keeps a second backend out", folder=False)
    try:
        stream = open(lock_path, "a+")
    except OSError as error:
        raise InputError(f"Cannot open the state folder's lock {lock_path} ({error.strerror or error}); give "
                         "--state-dir a folder this user may write to.") from None
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here, rely on the user
        return stream
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        stream.close()
        raise InputError(f"Another farslip backend is already using the state directory {state_dir}; stop it "
                         "first, or give this one its own --state-dir.") from None
    return stream


SHUTDOWN_LIMIT_S = 60.0
PARENT_POLL_S = 2.0


def parent_process(pid: int):
    """The process `--parent-pid` names (psutil; it tells a reused pid from the original), or InputError."""
    import psutil

    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        raise InputError(f"--parent-pid {pid}: no such process is running; the backend would stop at once.") from None


def _stop_with_parent(parent, stop: Callable[[], None]) -> None:
    """Call `stop` once `parent` has ended (QGIS exited or crashed: the backend it started must not stay)."""
    while parent.is_running() and parent.status() != "zombie":
        time.sleep(PARENT_POLL_S)
    log.info("the process that started this backend (pid %d) has ended; shutting down", parent.pid)
    stop()


def exit_now(code: int) -> None:
    """End the process after a finished `serve`: exit handlers run, streams flushed, but no teardown of
    every module (with torch and the engine imported that took 3-5 s after the server had stopped, which
    the plugin waits for when it stops its backend)."""
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _exit_after(seconds: float, cleanup: Callable[[], None]) -> None:
    time.sleep(seconds)
    log.error("shutdown took longer than %.0f s (a request or job did not stop); exiting now", seconds)
    cleanup()
    os._exit(1)


def serve(host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          connection_file: str | Path | None = None, state_dir: Path | None = None, device: str | None = None,
          log_level: str = "INFO", feature_cache_mb: int = FEATURE_CACHE_MB, feature_cache_disk_mb: int = 0,
          parent_pid: int | None = None) -> None:
    """Run the backend until SIGTERM/SIGINT (or until the process `parent_pid` ends): print the URL, write the
    connection file, serve /v1."""
    import uvicorn

    from backend.engine.paths import state_dir as default_state_dir

    if token is not None:
        check_token(token)
    parent = parent_process(parent_pid) if parent_pid is not None else None
    if connection_file is not None:  # given as typed: a Path drops a trailing separator
        refuse_folder_name(connection_file, "--connection-file")
    from backend.engine.devices import resolve_device

    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    connection_file = Path(connection_file or state_dir / "backend.json").expanduser().resolve()
    # What needs no state folder is checked before one is made or written to: a bad --device, --host or a port in
    # use (and a file at --connection-file that is not a connection file) left jobs.sqlite, backend.lock and
    # logs/ in a fresh --state-dir.
    device = str(resolve_device(device or os.environ.get("FARSLIP_DEVICE") or "auto"))
    connection_file_info(connection_file)
    sock = bind_socket(host, port)
    lock = None
    try:
        prepare_state_dir(state_dir)
        log_file = setup_logging(state_dir, log_level)
        lock = _lock_state_dir(state_dir)
        # Opened once before the server starts: a folder in its place is a sentence, a damaged history is set
        # aside (a failure in the app's startup ended in uvicorn's traceback, and the backend never started).
        JobStore(state_dir / "jobs.sqlite").close()
        refuse_taken_connection_file(connection_file)
        check_connection_file_location(connection_file)
    except BaseException:
        sock.close()
        if lock is not None:
            lock.close()
        raise
    if listens_beyond_loopback(sock):
        log.warning("listening on %s: other machines on the network can reach this backend. Anyone with "
                    "the token can read and write files as this user; prefer 127.0.0.1.", host)
    token = token or secrets.token_urlsafe(32)
    port = sock.getsockname()[1]
    # A wildcard address is not one a client can connect to; local clients use loopback.
    url_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(
        host, f"[{host}]" if ":" in host else host)
    url = f"http://{url_host}:{port}"
    pid = os.getpid()

    def cleanup() -> None:
        remove_connection_file(connection_file, pid)

    app = create_app(token, state_dir, device=device, on_shutdown=cleanup, feature_cache_mb=feature_cache_mb,
                     feature_cache_disk_mb=feature_cache_disk_mb, host=host, connection_file=connection_file)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on", log_level=log_level.lower())
    server = uvicorn.Server(config)

    async def announce():
        # After startup, so a client that reads the file finds a server that answers.
        write_connection_file(connection_file, {"url": url, "port": port, "token": token, "pid": pid,
                                                "version": __version__})
        print(f"FarSLIP backend {__version__} listening on {url}", flush=True)
        print(f"Connection file (URL + token): {connection_file}", flush=True)
        print(f"Log file: {log_file}", flush=True)

    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        if not server.should_exit:
            await announce()

    server.startup = startup
    original_handle_exit = server.handle_exit

    def handle_exit(sig, frame):
        # A request handler stuck in a system call (a file that never answers) must not keep the
        # process alive: after the graceful part, exit regardless.
        if not server.should_exit:
            threading.Thread(target=_exit_after, args=(SHUTDOWN_LIMIT_S, cleanup), daemon=True,
                             name="farslip-shutdown-limit").start()
        original_handle_exit(sig, frame)

    server.handle_exit = handle_exit
    app.state.request_exit = lambda: handle_exit(signal.SIGTERM, None)  # POST /v1/shutdown
    if parent is not None:
        threading.Thread(target=_stop_with_parent, args=(parent, lambda: handle_exit(signal.SIGTERM, None)),
                         daemon=True, name="farslip-parent-watch").start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into a normal exit so that
    # the finally below runs and the exit status is 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        cleanup()
        sock.close()
        lock.close()


def serve_command(host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                  connection_file: str | None = None, state_dir: str | None = None,
                  device: str = "auto", feature_cache_mb: int = FEATURE_CACHE_MB,
                  feature_cache_disk_mb: int = 0, parent_pid: int | None = None) -> int:
    """Entry point for the CLI's `serve` command; returns the exit code."""
    if not 0 <= port <= 65535:  # bind() raised OverflowError (a traceback), or -1 was blamed on --host
        print(f"Error: --port must be a TCP port, 0 to 65535 (0 picks a free one); got {port}.", file=sys.stderr)
        return 2
    if feature_cache_mb < 0 or feature_cache_disk_mb < 0:
        print("Error: --feature-cache-mb and --feature-cache-disk-mb must not be negative (0 turns a cache off).",
              file=sys.stderr)
        return 2
    try:
        serve(host, port, token or os.environ.get("FARSLIP_TOKEN") or None,
              connection_file or None, Path(state_dir) if state_dir else None,
              device=device, feature_cache_mb=feature_cache_mb, feature_cache_disk_mb=feature_cache_disk_mb,
              parent_pid=parent_pid)
    except FarslipError as error:
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 0
    except SystemExit as stopped:  # SIGTERM, after the graceful shutdown (serve makes it sys.exit(0))
        return stopped.code if isinstance(stopped.code, int) else 0
    return 0
