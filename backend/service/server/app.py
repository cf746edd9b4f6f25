"""The FastAPI app: error bodies as one sentence, OPTIONS and Allow, and the job store and worker it owns."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from backend import __version__
from backend.engine.errors import FarslipError, shortened
from backend.service.http_words import for_http, kind_of_path
from backend.service.jobs import JobManager, JobStore, default_runners

from .routes import v1_router
from .security import MAX_BODY_BYTES, GuardMiddleware, backend_files, quoted

log = logging.getLogger("farslip.server")

FEATURE_CACHE_MB = 1024  # ~2,600 ViT-B/16 crops: a 300 Mpx extent re-runs without the encoder


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
    if "GET" in methods:
        methods.add("HEAD")  # answered as GET without the body (HeadAsGet)
    return sorted(methods)


class HeadAsGet:
    """HEAD on an endpoint that takes GET is answered as GET without its body (monitors and scripts probe
    /v1/health so); FastAPI's routes take only the methods they declare."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)
        fastapi_app = scope.get("app")
        if fastapi_app is None or "GET" not in allowed_methods(fastapi_app, scope.get("path", "")):
            return await self.app(scope, receive, send)

        async def without_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET"}, receive, without_body)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_sentence(error: RequestValidationError, request: Request | None = None) -> str:
    errors = error.errors()
    for item in errors:
        if item.get("type") == "json_invalid":
            where = [part for part in item.get("loc", ()) if isinstance(part, int)]
            at = f" (at character {where[0]})" if where else ""
            return f"The request body is not valid JSON{at}; send one JSON object with the request's fields."
    content_type = request.headers.get("content-type", "") if request is not None else "application/json"
    if not _is_json(content_type) and any(tuple(item.get("loc", ())) == ("body",) for item in errors):
        sent = f" (it was sent as {content_type[:100]!r})" if content_type else ""
        return ("The request body is not read as JSON" + sent + "; send the body as JSON with "
                "Content-Type: application/json.")
    parts = []
    for item in errors[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {item.get('msg', 'invalid')}")
    more = len(errors) - 5
    return "The request is not valid: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "") + "."


def unreadable_body(cause: BaseException) -> str:
    """The sentence for a body that is JSON to the parser's first look but cannot be read (FastAPI answers
    "There was an error parsing the body" for these)."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"The request body is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at position "
                f"{cause.start}); send the JSON as UTF-8.")
    if isinstance(cause, RecursionError):
        return "The request body nests lists or objects too deeply; send one JSON object with the request's fields."
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return ("The request body holds a number with too many digits; send numbers as the request's fields "
                "take them (e.g. 8, 0.5, 487000.0).")
    return (f"The request body cannot be read as JSON ({type(cause).__name__}); send one JSON object with the "
            "request's fields.")


def no_such_endpoint(path: str) -> str:
    return (f"There is no endpoint {quoted(path)}; the API's endpoints are under /v1/ (e.g. GET /v1/health), "
            "and /docs lists them all.")


def _answer_errors_in_one_sentence(app: FastAPI) -> None:
    @app.exception_handler(FarslipError)
    async def farslip_error(request: Request, error: FarslipError):
        # The engine's sentence, with its command-line flags said as the request's fields.
        detail = for_http(shortened(str(error)), kind_of_path(request.url.path))
        return JSONResponse({"detail": detail}, status_code=error.http_status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return JSONResponse({"detail": _validation_sentence(error, request)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        headers = {key: value for key, value in (getattr(error, "headers", None) or {}).items()
                   if key.lower() != "allow"}
        status, detail = error.status_code, str(error.detail)
        if status == 405:
            methods = allowed_methods(app, request.url.path)
            if methods == ["OPTIONS"]:  # only the catch-all OPTIONS route matched: no such endpoint
                status, detail = 404, no_such_endpoint(request.url.path)
            else:
                headers["allow"] = ", ".join(methods)
                named = [method for method in methods if method not in ("OPTIONS", "HEAD")]
                detail = (f"{quoted(request.url.path)} does not take {request.method}; it takes "
                          f"{' or '.join(named)}.")
        elif status == 404 and detail == "Not Found":
            detail = no_such_endpoint(request.url.path)
        elif status == 400 and error.__cause__ is not None:  # FastAPI's "error parsing the body"
            detail = unreadable_body(error.__cause__)
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

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


def create_app(token: str, state_dir: Path, device: str | None = None,
               on_shutdown: Callable[[], None] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               runners: dict | None = None, feature_cache_mb: int = FEATURE_CACHE_MB,
               feature_cache_disk_mb: int = 0, host: str = "127.0.0.1",
               connection_file: Path | None = None) -> FastAPI:
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
        try:
            store.mark_interrupted()
            store.prune_finished()
        except Exception:  # the history's cleanup must never keep the backend from starting
            log.exception("could not mark the previous backend's unfinished jobs interrupted")
        features = FeatureCache(feature_cache_mb * 2**20, state_dir / "features", feature_cache_disk_mb * 2**20)
        manager = JobManager(store, runners if runners is not None else default_runners(), device=device,
                             features=features)
        manager.start()
        app.state.manager = manager
        app.state.health_threads = anyio.CapacityLimiter(2)  # GET /v1/health's own (see routes.models.health)
        log.info("backend ready: device %s, state in %s", device, state_dir)
        try:
            yield
        finally:
            running = any(job["state"] == "running" for job in manager.list())
            log.info("shutting down: cancelling the running job" if running else "shutting down")
            manager.shutdown()
            store.close()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="FarSLIP backend", version=__version__, lifespan=lifespan,
                  description="Open-vocabulary segmentation of GeoTIFFs. Every /v1 endpoint needs "
                              "`Authorization: Bearer <token>` (the token is in the connection file).")
    app.state.device = device
    app.state.backend_files = backend_files(state_dir, connection_file)
    app.add_middleware(HeadAsGet)  # inside the guard: a HEAD needs the token as its GET does
    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=max_body_bytes, host=host)
    _answer_errors_in_one_sentence(app)
    app.include_router(v1_router())
    return app
