"""The backend process: state folder and its lock, logging, listening socket, connection file, shutdown.

`serve` runs until SIGTERM/SIGINT; a shutdown that hangs (a request stuck in a system call) ends
the process after SHUTDOWN_LIMIT_S regardless, and the connection file is removed either way.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend import __version__
from backend.engine.atomic import write_text_atomically
from backend.engine.errors import FarslipError, InputError

from .app import FEATURE_CACHE_MB, create_app
from .security import LOCAL_HOSTS

log = logging.getLogger("farslip.server")


def setup_logging(state_dir: Path, level: str = "INFO") -> Path:
    """Log to a rotating file in the state directory and to stderr; returns the file's path."""
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "backend.log"
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=5 * 2**20, backupCount=3,
                                                        encoding="utf-8")
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


def refuse_taken_connection_file(path: Path) -> None:
    """Another running backend's connection file is not ours to replace (its clients would lose it)."""
    from backend.engine.temporary import process_is_alive

    try:
        pid = int(json.loads(path.read_text(encoding="utf-8")).get("pid"))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if pid != os.getpid() and process_is_alive(pid):
        raise InputError(f"The connection file {path} belongs to a backend that is running (process {pid}); stop "
                         "that one first, or give this one its own --connection-file.")


def remove_connection_file(path: Path, pid: int) -> None:
    """Remove the connection file if it is still ours (another backend may have replaced it)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind ourselves so that port 0 gives a real, known port before the server starts."""
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
        raise InputError(f"Cannot listen on {host}:{port}: {error.strerror or error}. "
                         "Choose another --port (0 picks a free one).") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _lock_state_dir(state_dir: Path):
    """Only one backend per state directory: a second would mark the first one's jobs interrupted."""
    lock_path = state_dir / "backend.lock"
    stream = open(lock_path, "a+")
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


def _exit_after(seconds: float, cleanup: Callable[[], None]) -> None:
    time.sleep(seconds)
    log.error("shutdown took longer than %.0f s (a request or job did not stop); exiting now", seconds)
    cleanup()
    os._exit(1)


def serve(host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          connection_file: Path | None = None, state_dir: Path | None = None, device: str | None = None,
          log_level: str = "INFO", feature_cache_mb: int = FEATURE_CACHE_MB, feature_cache_disk_mb: int = 0) -> None:
    """Run the backend until SIGTERM/SIGINT: print the URL, write the connection file, serve /v1."""
    import uvicorn

    from backend.engine.paths import state_dir as default_state_dir

    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)  # job history names the user's files
    connection_file = Path(connection_file or state_dir / "backend.json").expanduser().resolve()
    log_file = setup_logging(state_dir, log_level)
    lock = _lock_state_dir(state_dir)
    try:
        refuse_taken_connection_file(connection_file)
    except InputError:
        lock.close()
        raise
    if host not in LOCAL_HOSTS:
        log.warning("listening on %s: other machines on the network can reach this backend. Anyone with "
                    "the token can read and write files as this user; prefer 127.0.0.1.", host)
    token = token or secrets.token_urlsafe(32)
    sock = bind_socket(host, port)
    port = sock.getsockname()[1]
    # A wildcard address is not one a client can connect to; local clients use loopback.
    url_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(
        host, f"[{host}]" if ":" in host else host)
    url = f"http://{url_host}:{port}"
    pid = os.getpid()

    def cleanup() -> None:
        remove_connection_file(connection_file, pid)

    app = create_app(token, state_dir, device=device, on_shutdown=cleanup, feature_cache_mb=feature_cache_mb,
                     feature_cache_disk_mb=feature_cache_disk_mb, host=host)
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
                  feature_cache_disk_mb: int = 0) -> int:
    """Entry point for the CLI's `serve` command; returns the exit code."""
    if feature_cache_mb < 0 or feature_cache_disk_mb < 0:
        print("Error: --feature-cache-mb and --feature-cache-disk-mb must not be negative (0 turns a cache off).",
              file=sys.stderr)
        return 2
    try:
        serve(host, port, token or os.environ.get("FARSLIP_TOKEN") or None,
              Path(connection_file) if connection_file else None, Path(state_dir) if state_dir else None,
              device=device, feature_cache_mb=feature_cache_mb, feature_cache_disk_mb=feature_cache_disk_mb)
    except FarslipError as error:
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 0
    return 0
