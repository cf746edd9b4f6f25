"""Who may talk to the backend and what a request may name: bearer token, Host check, body limit, paths.

The token and Host checks run in GuardMiddleware, before anything reads the request body; the path
rules run in the handlers, before the engine's own checks.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fastapi import HTTPException

from backend.engine.checks import quick_network_reads
from backend.engine.errors import InputError, shown
from backend.engine.files import expand_user, is_gdal_name, is_gdal_virtual, raster_file

MAX_BODY_BYTES = 1024 * 1024
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def quoted(text: str, limit: int = 200) -> str:
    """A text from the request (a path, a job id) as a sentence quotes it (errors.shown): an answer never
    echoes a hostile request back whole."""
    return shown(text, limit)


# --------------------------------------------------------------------------- request paths

def _without_control_characters(text: str, what: str) -> None:
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InputError(f"The {what} path {text!r} holds the control character {bad!r}; give a path without "
                         "tabs, newlines or other control characters.")


def absolute_path(text: str, what: str) -> Path:
    """A path in a request: the backend has no working folder a relative path could mean."""
    _without_control_characters(text, what)
    path = expand_user(text, what)
    if not path.is_absolute():
        raise InputError(f"The {what} path {text!r} is relative; the backend cannot know which folder it is "
                         "relative to. Give an absolute path.")
    return path


@contextlib.contextmanager
def request_checks() -> Iterator[None]:
    """Around a request's checks: an OSError from the file system (a name too long, a folder it may not
    read) is the request's fault, a 400 sentence naming the path, never a 500. A network raster gets a
    few seconds per read (checks.quick_network_reads): a server that never answers must not hold the
    request's thread."""
    try:
        with quick_network_reads():
            yield
    except OSError as error:
        name = f" {error.filename}" if error.filename else ""
        raise InputError(f"The path{name} in the request cannot be used ({error.strerror or error}); check the "
                         "request's paths and send it again.") from None


def raster_path(text: str, what: str = "raster") -> str:
    """A raster in a request, kept as the text given: a GDAL name (/vsizip//d/a.zip/x.tif, /vsicurl/...,
    NETCDF:"/d/a.nc":var, GPKG:/d/a.gpkg:table) as it is unless the file it reads here is named relative
    (files.raster_file), else an absolute path."""
    if not is_gdal_name(text):
        return str(absolute_path(text, what))
    _without_control_characters(text, what)
    # The archive of /vsizip/a.zip/x.tif, the file of GPKG:a.gpkg:table, as the name writes it: relative, it is
    # read in whatever folder the backend was started from (when not found there, GDAL does not find it either).
    file = raster_file(text)
    if file is not None and not file.is_absolute():
        raise InputError(f"The {what} {text!r} {'reads' if is_gdal_virtual(text) else 'names'} the file "
                         f"{str(file)!r}, which is relative; the backend cannot know which folder it is relative "
                         "to. Give its absolute path.")
    return text


def output_path(text: str, what: str, example: str = "/data/result.gpkg") -> Path:
    """An output in a request: an absolute path with a name to write to (not `/`)."""
    path = absolute_path(text, what)
    if not path.name:
        raise InputError(f"The {what} path {text!r} has no name to write to; give a path such as {example}.")
    return path


def backend_files(state_dir: Path, connection_file: Path | None = None) -> dict[str, Path]:
    """The backend's own files, which no job may write over or inside: {what they are: path}."""
    named = {"job history": state_dir / "jobs.sqlite", "job history's journal": state_dir / "jobs.sqlite-wal",
             "job history's shared memory": state_dir / "jobs.sqlite-shm", "log folder": state_dir / "logs",
             "feature cache": state_dir / "features", "lock file": state_dir / "backend.lock"}
    if connection_file is not None:
        named["connection file"] = connection_file
    return named


def refuse_backend_files(outputs: list[str], protected: dict[str, Path]) -> None:
    """No output of a job may be one of the backend's own files, lie inside its folders, or be a folder
    that holds them (a model folder written with overwrite replaces the folder): the job history, the
    log or the connection file the plugin reads would be lost."""
    for output in outputs:
        out = os.path.realpath(output)
        for what, path in protected.items():
            own = os.path.realpath(path)
            if out == own or out.startswith(own + os.sep) or own.startswith(out.rstrip(os.sep) + os.sep):
                raise InputError(f"The output {quoted(str(output))} would write over the backend's {what} ({own}); "
                                 "choose an output outside the backend's state folder.")


def looks_like_path(text: str) -> bool:
    """A --model value that names a file rather than a registry model."""
    return any(sep in text for sep in ("/", "\\")) or text.startswith("~") or text.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def checked_paths(body, outputs: tuple[str, ...]) -> dict:
    """The request as a dict, after the path rules every job shares (absolute raster, outputs, weights)."""
    request = body.model_dump()
    if request.get("raster") is not None:
        raster_path(request["raster"])
    if request.get("weights") is not None:
        absolute_path(request["weights"], "weights")
    for name in outputs:
        if request.get(name) is not None:
            output_path(request[name], name)
    if request.get("model") is not None and looks_like_path(request["model"]):
        absolute_path(request["model"], "model")
    return request


# --------------------------------------------------------------------------- token, host, body size

class BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so that FastAPI passes it through as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit // 1024} KiB; requests carry paths "
                              "and options, never pixels.")


MIN_TOKEN_CHARACTERS = 16


def check_token(token: str) -> None:
    """A token given with --token or $FARSLIP_TOKEN: at least MIN_TOKEN_CHARACTERS visible ASCII characters
    (letters, digits, punctuation; no spaces). Spaces are stripped from the header, so a token with them never
    matches; other characters reach the server differently from client to client (HTTP headers are bytes);
    a short one can be guessed."""
    bad = next((c for c in token if not ("!" <= c <= "~")), None)
    if bad is not None:
        raise InputError(f"The access token holds the character {bad!r}; a token is made of visible ASCII "
                         "characters only (letters, digits, punctuation; no spaces), at least "
                         f"{MIN_TOKEN_CHARACTERS} of them.")
    if len(token) < MIN_TOKEN_CHARACTERS:
        raise InputError(f"The access token is {len(token)} characters long; give at least {MIN_TOKEN_CHARACTERS} "
                         "(visible ASCII: letters, digits, punctuation), or no --token for a random one.")


def bearer_matches(header: bytes, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any letter case (RFC 7235)."""
    scheme, _, credentials = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


def _host_and_port(header: str) -> str | None:
    """The host of a Host header `host[:port]` (`[v6]` or `[v6]:port` for IPv6), lower case; None if malformed."""
    text = header.strip().lower()
    if ":" in text and _ip(text) is not None:  # a bare IPv6 literal (no port can follow it)
        return text
    match = _HOST_HEADER.fullmatch(text)
    if match is None:
        return None
    return match.group("v6") or match.group("name")


# host[:port] or [IPv6][:port]: one colon at most outside the brackets, and a port of digits only.
_HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]/@\s]+))(?::\d{1,5})?")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_is_allowed(host_header: str, bound_host: str) -> bool:
    """`localhost`, loopback IP literals and the address the backend was told to listen on; no other DNS names.

    A web page whose DNS name was rebound to 127.0.0.1 sends its own name here, never an IP literal:
    so when the backend listens beyond loopback (--host 0.0.0.0 or a LAN address), IP literals are served too.
    """
    host = _host_and_port(host_header)
    if host is None:
        return False
    bound = bound_host.strip().strip("[]").lower()
    address = _ip(host)
    if host == "localhost" or (address is not None and address.is_loopback) or host == bound:
        return True
    bound_address = _ip(bound)
    listens_beyond_loopback = bound != "localhost" and not (bound_address is not None and bound_address.is_loopback)
    return listens_beyond_loopback and address is not None


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
