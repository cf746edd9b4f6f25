"""`farslip serve`: the local HTTP API (/v1) the QGIS plugin talks to.

Handlers are a few lines: they check the request with the engine's own
checks (so a bad input gets the same sentence as on the command line), then
hand the job to the JobManager, whose single worker thread owns the model.
Every /v1 request needs `Authorization: Bearer <token>`; the token is made
fresh at each start unless given, and written with the URL to a connection
file only the user can read.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
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
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from backend import __version__
from backend.engine.atomic import write_text_atomically
from backend.engine.errors import FarslipError, InputError
from backend.engine.files import expand_user
from backend.engine.options import path_fields
from backend.service.jobs import JobManager, JobStore, check_segment_job, is_job_id
from backend.service.schemas import (
    DeviceInfo,
    DownloadRequest,
    ErrorBody,
    EvaluateRequest,
    Health,
    Job,
    JobCreated,
    JobList,
    ModelList,
    IndexRequest,
    PresetList,
    SearchRequest,
    SegmentRequest,
    TrainRequest,
    options_from_request,
)

log = logging.getLogger("farslip.server")

MAX_BODY_BYTES = 1024 * 1024
FEATURE_CACHE_MB = 1024  # ~2,600 ViT-B/16 crops: a 300 Mpx extent re-runs without the encoder
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 422)}


# --------------------------------------------------------------------------- device

def device_info(device: str) -> DeviceInfo:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index or 0
        free, _total = torch.cuda.mem_get_info(index)
        return DeviceInfo(type="cuda", name=torch.cuda.get_device_name(index), free_memory_mb=free // 2**20)
    if kind == "mps":
        return DeviceInfo(type="mps", name="Apple GPU (MPS)")
    import platform

    return DeviceInfo(type="cpu", name=platform.processor() or platform.machine() or "CPU")


# --------------------------------------------------------------------------- request checks

def _absolute(text: str, what: str) -> Path:
    if "\x00" in text:
        raise InputError(f"The {what} path contains a NUL character; give a real file path.")
    path = expand_user(text, what)
    if not path.is_absolute():
        raise InputError(f"The {what} path {text!r} is relative; the backend cannot know which folder it is "
                         "relative to. Give an absolute path.")
    return path


def _looks_like_path(text: str) -> bool:
    return any(sep in text for sep in ("/", "\\")) or text.startswith("~") or text.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def check_segment_request(request: SegmentRequest, device: str) -> list[str]:
    """Run the engine's checks on a request; returns the files the job will write.

    Raises the engine's InputError/ModelError, so the sentence is the one `farslip segment` prints.
    """
    for name in path_fields():
        value = getattr(request, name)
        if value is not None:
            _absolute(value, name.replace("_", " "))
    if request.model is not None and _looks_like_path(request.model):
        _absolute(request.model, "model")
    return check_segment_job(options_from_request(request.model_dump()), device)


def checked_paths(body, outputs: tuple[str, ...]) -> dict:
    """The request as a dict, after the path rules every job shares (absolute raster, outputs, weights)."""
    request = body.model_dump()
    for name in ("raster", *outputs, "weights"):
        if request.get(name) is not None:
            _absolute(request[name], name)
    if request.get("model") is not None and _looks_like_path(request["model"]):
        _absolute(request["model"], "model")
    return request


# --------------------------------------------------------------------------- security + limits

class BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so that FastAPI passes it through as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit // 1024} KiB; requests carry paths "
                              "and options, never pixels.")


def bearer_matches(header: bytes, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any letter case (RFC 7235)."""
    scheme, _, credentials = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


def host_is_allowed(host_header: str, bound_host: str) -> bool:
    """Loopback names, IP literals and the address the backend was told to listen on; no other DNS names."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in LOCAL_HOSTS or host == bound_host.lower():
        return True
    if bound_host in LOCAL_HOSTS:
        return host in ("127.0.0.1", "::1") or host.startswith("127.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class GuardMiddleware:
    """Bearer-token check on /v1 (before anything reads the body) and a request body size limit."""

    def __init__(self, app, token: str, max_body_bytes: int = MAX_BODY_BYTES, host: str = "127.0.0.1"):
        self.app = app
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes
        self.host = host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_is_allowed(host, self.host):
            # A web page whose DNS name was rebound to 127.0.0.1 sends its own name here.
            return await _send_error(send, 421, f"The Host header {host[:100]!r} does not name this machine's "
                                     "loopback address; connect to the backend by 127.0.0.1 or localhost.")
        path = scope.get("path", "")
        if path == "/v1" or path.startswith("/v1/"):
            if not bearer_matches(headers.get(b"authorization", b""), self.token):
                return await _send_error(send, 401, "Missing or wrong access token: send the header "
                                         "'Authorization: Bearer <token>' with the token from the backend's "
                                         "connection file.", {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                return await _send_error(send, 400, "The Content-Length header is not a number.")
            if too_large:
                return await _send_error(send, 413, BodyTooLarge(self.max_body_bytes).detail)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as error:
            if not started:
                await _send_error(send, 413, error.detail)


async def _send_error(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route answers on `path` (for OPTIONS and the Allow header of a 405).

    Read from the OpenAPI description (the API's routes, however routers are nested) plus the
    documentation pages, which the description leaves out.
    """
    methods = {"OPTIONS"}
    templates = [(template, {m.upper() for m in operations}) for template, operations in app.openapi()["paths"].items()]
    templates += [(route.path, set(route.methods)) for route in app.routes
                  if isinstance(getattr(route, "path", None), str) and getattr(route, "methods", None)
                  and "{path:path}" not in route.path]
    for template, route_methods in templates:
        if compile_path(template)[0].match(path):
            methods |= route_methods
    return sorted(methods)


def _validation_sentence(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {item.get('msg', 'invalid')}")
    more = len(error.errors()) - 5
    return "The request is not valid: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "") + "."


# --------------------------------------------------------------------------- the app

def create_app(token: str, state_dir: Path, device: str | None = None,
               on_shutdown: Callable[[], None] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               runners: dict | None = None, feature_cache_mb: int = FEATURE_CACHE_MB,
               feature_cache_disk_mb: int = 0, host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app; the job store opens and the worker starts when the app starts.

    Segment jobs share a feature cache of at most feature_cache_mb MiB in memory and, when
    feature_cache_disk_mb > 0, that much on disk in STATE_DIR/features.
    """
    from backend.engine.feature_cache import FeatureCache
    from backend.engine.devices import resolve_device

    state_dir = Path(state_dir)
    device = str(resolve_device(device or os.environ.get("FARSLIP_DEVICE") or "auto"))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Import the engine now rather than in the first request, which would otherwise take seconds.
        import backend.engine.segment  # noqa: F401

        store = JobStore(state_dir / "jobs.sqlite")
        store.mark_interrupted()
        features = FeatureCache(feature_cache_mb * 2**20, state_dir / "features", feature_cache_disk_mb * 2**20)
        manager = JobManager(store, runners if runners is not None else default_runners(), device=device,
                             features=features)
        manager.start()
        app.state.manager = manager
        log.info("backend ready: device %s, state in %s", device, state_dir)
        try:
            yield
        finally:
            log.info("shutting down: cancelling the running job")
            manager.shutdown()
            store.close()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="FarSLIP backend", version=__version__, lifespan=lifespan,
                  description="Open-vocabulary segmentation of GeoTIFFs. Every /v1 endpoint needs "
                              "`Authorization: Bearer <token>` (the token is in the connection file).")
    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=max_body_bytes, host=host)

    @app.exception_handler(FarslipError)
    async def farslip_error(_request: Request, error: FarslipError):
        return JSONResponse({"detail": str(error)}, status_code=error.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError):
        return JSONResponse({"detail": _validation_sentence(error)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        headers = {key: value for key, value in (getattr(error, "headers", None) or {}).items()
                   if key.lower() != "allow"}
        if error.status_code == 405:
            headers["allow"] = ", ".join(allowed_methods(app, request.url.path))
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code, headers=headers)

    @app.options("/{path:path}", include_in_schema=False)
    def options(path: str, request: Request):
        methods = allowed_methods(app, request.url.path)
        if methods == ["OPTIONS"]:
            raise StarletteHTTPException(404, "Not Found")
        return Response(status_code=204, headers={"allow": ", ".join(methods)})

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception):
        log.exception("unexpected error in a request")
        return JSONResponse({"detail": f"The backend hit an unexpected error ({type(error).__name__}); "
                                       "its log file has the details."}, status_code=500)

    # Documents the scheme on /docs; the check itself is GuardMiddleware's, before the body is read.
    bearer = HTTPBearer(auto_error=False, description="The token from the backend's connection file.")
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], responses=ERROR_RESPONSES)

    def manager_of(request: Request) -> JobManager:
        return request.app.state.manager

    def job_or_404(job: dict | None, job_id: str) -> dict:
        if job is None:
            raise StarletteHTTPException(404, f"There is no job {job_id!r}; GET /v1/jobs lists the jobs.")
        return job

    @v1.get("/health", response_model=Health)
    def health(request: Request):
        manager = manager_of(request)
        features = manager.models.features
        return Health(version=__version__, device=device_info(device), loaded_model=manager.loaded_model,
                      feature_cache=features.stats() if features is not None else None)

    @v1.get("/models", response_model=ModelList)
    def models(request: Request):
        from backend.engine.models import list_models
        from backend.engine.registry import DEFAULT_MODEL

        loaded = manager_of(request).loaded_model
        entries = [dict(entry, loaded=bool(loaded) and entry.get("name") == loaded) for entry in list_models()]
        from backend.engine.sam_models import list_sam_models

        return {"default": DEFAULT_MODEL, "models": entries, "sam_models": list_sam_models()}

    @v1.post("/evaluate", response_model=JobCreated, status_code=202)
    def submit_evaluate(body: EvaluateRequest, request: Request):
        from backend.service.evaluate_jobs import check_evaluate_request

        for name in ("raster", "labels", "out_json"):
            if getattr(body, name):
                _absolute(getattr(body, name), name)
        outputs = check_evaluate_request(body.model_dump())
        job = manager_of(request).submit("evaluate", body.model_dump(), outputs)
        return JobCreated(job_id=job["id"], state=job["state"])

    @v1.post("/models/download", response_model=JobCreated, status_code=202)
    def submit_download(body: DownloadRequest, request: Request):
        from backend.service.downloads import check_download_request

        check_download_request(body.model_dump())
        job = manager_of(request).submit("download", body.model_dump(), [])
        return JobCreated(job_id=job["id"], state=job["state"])

    @v1.get("/presets", response_model=PresetList)
    def presets():
        from backend.engine.presets import list_presets

        return {"presets": list_presets()}

    @v1.post("/segment", response_model=JobCreated, status_code=202)
    def submit_segment(body: SegmentRequest, request: Request):
        manager = manager_of(request)
        outputs = check_segment_request(body, manager.models.device)
        job = manager.submit("segment", body.model_dump(), outputs)
        return JobCreated(job_id=job["id"], state=job["state"])

    @v1.post("/train", response_model=JobCreated, status_code=202)
    def submit_train(body: TrainRequest, request: Request):
        outputs = check_train_request(body)
        job = manager_of(request).submit("train", body.model_dump(), outputs)
        return JobCreated(job_id=job["id"], state=job["state"])

    @v1.post("/index", response_model=JobCreated, status_code=202)
    def submit_index(body: IndexRequest, request: Request):
        from backend.service.search_jobs import check_index_request

        outputs = check_index_request(checked_paths(body, ()))
        job = manager_of(request).submit("index", body.model_dump(), outputs)
        return JobCreated(job_id=job["id"], state=job["state"])

    @v1.post("/search", response_model=JobCreated, status_code=202)
    def submit_search(body: SearchRequest, request: Request):
        from backend.service.search_jobs import check_search_request

        outputs = check_search_request(checked_paths(body, ("out",)))
        job = manager_of(request).submit("search", body.model_dump(), outputs)
        return JobCreated(job_id=job["id"], state=job["state"])

    @v1.get("/jobs", response_model=JobList)
    def jobs(request: Request, limit: int = Query(200, ge=1, le=10000)):
        return {"jobs": manager_of(request).list(limit)}

    @v1.get("/jobs/{job_id}", response_model=Job)
    def job(job_id: str, request: Request):
        return job_or_404(manager_of(request).get(job_id) if is_job_id(job_id) else None, job_id)

    @v1.delete("/jobs/{job_id}", response_model=Job)
    def cancel(job_id: str, request: Request):
        return job_or_404(manager_of(request).cancel(job_id) if is_job_id(job_id) else None, job_id)

    app.include_router(v1)
    return app


# --------------------------------------------------------------------------- job runners

def default_runners() -> dict:
    from backend.service.downloads import run_download
    from backend.service.evaluate_jobs import run_evaluate
    from backend.service.jobs import run_segment, run_train
    from backend.service.search_jobs import run_index, run_search

    return {"segment": run_segment, "train": run_train, "index": run_index, "search": run_search,
            "download": run_download, "evaluate": run_evaluate}


def check_train_request(request: TrainRequest) -> list[str]:
    """The trainer's own quick checks; returns the model folder the job will write."""
    for name in ("raster", "labels", "out"):
        _absolute(getattr(request, name), name)
    try:
        from training import api
    except ImportError:
        raise FarslipError("This backend cannot train: the training package is not installed.") from None
    return list(api.check_request(request.model_dump(exclude_none=True)))


# --------------------------------------------------------------------------- serve

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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the FarSLIP backend (same as `farslip serve`).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token")
    parser.add_argument("--connection-file")
    parser.add_argument("--state-dir")
    parser.add_argument("--device", default="auto")
    arguments = parser.parse_args()
    sys.exit(serve_command(arguments.host, arguments.port, arguments.token, arguments.connection_file,
                           arguments.state_dir, arguments.device))
