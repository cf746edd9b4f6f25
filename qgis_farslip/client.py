"""The backend's HTTP API (/v1), with the standard library only.

Every call blocks until the backend answers, so the plugin makes them from a
QgsTask or a Processing algorithm, never from the GUI thread.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .messages import dock_words, job_in_dock_words

FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
# The backend on this computer is asked directly, never through the proxy the system names (http_proxy, Windows'
# Internet Options, macOS's System Settings): a proxy cannot reach this computer's 127.0.0.1. A backend on another
# machine is asked as the system says (its proxy, or none for the addresses it exempts).
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_loopback(url: str) -> bool:
    """Whether the URL names this computer (localhost, 127.0.0.0/8, ::1)."""
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BackendError(Exception):
    """The backend refused a request; the message is the backend's sentence for the user."""


class BackendUnreachable(BackendError):
    """Nothing answers at the backend's address."""


class BackendRefused(BackendError):
    """The backend refused the request as it was sent (HTTP 4xx): the message says what to change."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class BackendTokenRefused(BackendError):
    """A backend answers, but not to this token (another backend on that port, or a stale token)."""


class Connection:
    """Where a running backend listens and the token it wants."""

    def __init__(self, url: str, token: str = "", pid: int | None = None, version: str = ""):
        self.url = url.rstrip("/")
        self.token = token
        self.pid = pid
        self.version = version

    @classmethod
    def from_file(cls, path: str) -> Connection:
        """Read the connection file `farslip serve --connection-file` writes."""
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not data.get("url"):
            raise ValueError(f"{path} is not a FarSLIP connection file (no 'url').")
        return cls(str(data["url"]), str(data.get("token") or ""), data.get("pid"), str(data.get("version") or ""))

    def __repr__(self) -> str:
        return f"Connection({self.url!r})"


def _detail(body: bytes, status: int) -> str:
    try:
        detail = json.loads(body.decode("utf-8")).get("detail")
    except (ValueError, AttributeError, UnicodeDecodeError):
        detail = None
    if isinstance(detail, list):
        # FastAPI's validation errors: [{"loc": [...], "msg": "..."}]
        detail = "; ".join(
            "{}: {}".format(".".join(str(part) for part in item.get("loc", [])[1:]), item.get("msg", ""))
            for item in detail if isinstance(item, dict)
        )
    return dock_words(str(detail)) if detail else f"The backend answered HTTP {status}."


def plain_reason(reason: object) -> str:
    """'connection refused' rather than '[Errno 111] Connection refused'."""
    text = str(getattr(reason, "strerror", None) or reason)
    return text[:1].lower() + text[1:] if text else "no answer"


class BackendClient:
    def __init__(self, connection: Connection, timeout: float = 30.0):
        self.connection = connection
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.connection.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.connection.token:
            request.add_header("Authorization", "Bearer " + self.connection.token)
        try:
            open_url = DIRECT.open if is_loopback(self.connection.url) else urllib.request.urlopen
            with open_url(request, timeout=timeout or self.timeout) as response:
                body = response.read()
            try:
                return json.loads(body.decode("utf-8") or "null")
            except ValueError:  # UnicodeDecodeError too
                raise BackendError(
                    f"What answers at {self.connection.url} is not a FarSLIP backend (its answer to {path} is not "
                    "JSON): check the backend's URL and port."
                ) from None
        except urllib.error.HTTPError as error:
            if error.code == 401:
                raise BackendTokenRefused(
                    f"The FarSLIP backend at {self.connection.url} answers but refuses the plugin's token: "
                    "the token in the FarSLIP settings (or the connection file) belongs to another backend."
                ) from None
            if 400 <= error.code < 500:
                raise BackendRefused(_detail(error.read(), error.code), error.code) from None
            raise BackendError(_detail(error.read(), error.code)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise BackendUnreachable(
                f"The FarSLIP backend at {self.connection.url} does not answer ({plain_reason(reason)})."
            ) from None

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        return self._request("GET", "/v1/health", timeout=timeout)

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")

    def presets(self) -> dict[str, list[str]]:
        return self._request("GET", "/v1/presets").get("presets", {})

    def segment(self, request: dict[str, Any]) -> str:
        return self._request("POST", "/v1/segment", request)["job_id"]

    def train(self, request: dict[str, Any]) -> str:
        return self._request("POST", "/v1/train", request)["job_id"]

    def submit(self, kind: str, request: dict[str, Any]) -> str:
        """Start a job of any kind (segment, train, index, search): POST /v1/<kind>; returns its id."""
        return self._request("POST", "/v1/" + urllib.parse.quote(kind, safe=""), request)["job_id"]

    def download_model(self, model: str) -> str:
        return self._request("POST", "/v1/models/download", {"model": model})["job_id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return job_in_dock_words(self._request("GET", "/v1/jobs/" + urllib.parse.quote(job_id, safe="")))

    def jobs(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/jobs").get("jobs", [])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", "/v1/jobs/" + urllib.parse.quote(job_id, safe=""))

    def shutdown(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the backend to stop (POST /v1/shutdown): as SIGTERM, which Windows does not have."""
        return self._request("POST", "/v1/shutdown", timeout=timeout)


def device_text(health: dict[str, Any]) -> str:
    """'NVIDIA RTX 4090 (cuda, 20480 MB free)' or 'CPU'."""
    device = health.get("device") or {}
    kind = device.get("type", "cpu")
    name = device.get("name") or kind.upper()
    if kind == "cpu":
        return name if name.lower().startswith("cpu") else f"CPU ({name})"
    free = device.get("free_memory_mb")
    return f"{name} ({kind}, {free} MB free)" if free is not None else f"{name} ({kind})"
