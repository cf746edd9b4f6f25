"""Fixtures for end-to-end tests of `farslip serve`: a real uvicorn process on 127.0.0.1, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
FARSLIP = Path(sys.executable).parent / "farslip"
NAIP = REPO / ".." / "shared" / "data" / "naip_2020_5m.tif"
# 300 x 300 pixels of the NAIP image (EPSG:26914): a few crops, so a job takes about a second.
SMALL_BBOX = [486500.0, 5206500.0, 488000.0, 5208000.0]
CLASS_LINES = ["water, lake", "cropland", "road"]
ACTIVE = ("queued", "running")


def backend_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FARSLIP_HOME=str(root / "home"), FARSLIP_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1",
               FARSLIP_DEVICE="cpu", PYTHONUNBUFFERED="1")
    return env


class Backend:
    """A `farslip serve --port 0` process and an authenticated httpx client for it."""

    def __init__(self, state_dir: Path, env: dict[str, str], *arguments: str):
        self.state_dir = state_dir
        self.connection_file = state_dir / "conn.json"
        self.log = open(state_dir.parent / f"{state_dir.name}-stderr.txt", "ab")
        self.process = subprocess.Popen(
            [str(FARSLIP), "serve", "--port", "0", "--state-dir", str(state_dir),
             "--connection-file", str(self.connection_file), *arguments],
            stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=REPO)
        deadline = time.monotonic() + 90
        while (info := self._read_connection_file()) is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"farslip serve exited with {self.process.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("farslip serve did not write its connection file within 90 s")
            time.sleep(0.05)
        self.info = info
        self.url = self.info["url"]
        self.token = self.info["token"]
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"},
                                   timeout=30)

    def _read_connection_file(self) -> dict | None:
        """The connection file once this process wrote it (a stale one of a dead backend may be there)."""
        try:
            info = json.loads(self.connection_file.read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("pid") == self.process.pid else None

    def submit(self, body: dict) -> str:
        response = self.client.post("/v1/segment", json=body)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def job(self, job_id: str) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 120, until=lambda job: job["state"] not in ACTIVE,
             history: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if history is not None:
                history.append(job)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']} after {timeout} s"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.log.close()
        return code


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def env(e2e_root) -> dict[str, str]:
    return backend_env(e2e_root)


@pytest.fixture(scope="session")
def start_backend(env, tmp_path_factory):
    """Start a backend on a state directory (a fresh one by default); stopped at the end of the session."""
    started: list[Backend] = []

    def start(state_dir: Path | None = None, *arguments: str) -> Backend:
        backend = Backend(state_dir or tmp_path_factory.mktemp("state"), env, *arguments)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        if backend.process.poll() is None:
            backend.stop()


@pytest.fixture(scope="module")
def backend(start_backend):
    """One backend shared by a test module, stopped (SIGTERM) after it."""
    backend = start_backend()
    yield backend
    if backend.process.poll() is None:
        assert backend.stop() == 0


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def segment_body(tiny_model, out_dir):
    """A small, valid segment request; keyword arguments replace fields."""

    def body(**changes) -> dict:
        request = {"raster": str(NAIP.resolve()), "class_lines": CLASS_LINES, "bbox": SMALL_BBOX,
                   "model": str(tiny_model), "out": str(out_dir / "result.gpkg")}
        request.update(changes)
        return request

    return body


@pytest.fixture(scope="session")
def farslip_cli(env):
    """Run `farslip ARGS...` with the backend's environment; returns the CompletedProcess."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(FARSLIP), *args], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=300)

    return run


@pytest.fixture(scope="session")
def start_cli(env):
    """Start `farslip ARGS...` in the background (text pipes); returns the Popen."""

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([str(FARSLIP), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=REPO)

    return start


@pytest.fixture(scope="session")
def serve_refusal(start_cli):
    """`farslip serve --port 0 ARGS` that must refuse to start: its exit status and stderr (killed, and the test
    failed, if it serves instead)."""

    def refusal(*args: str) -> tuple[int, str]:
        process = start_cli("serve", "--port", "0", *args)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"farslip serve {' '.join(args)} started instead of refusing: {stderr}")
        return process.returncode, stderr

    return refusal


@pytest.fixture(scope="session")
def small_bbox() -> list[float]:
    """SMALL_BBOX for test modules (`from conftest import` finds another folder's conftest in a full run)."""
    return list(SMALL_BBOX)


@pytest.fixture(scope="session")
def naip() -> Path:
    assert NAIP.is_file(), f"{NAIP} is missing (../shared/data)"
    return NAIP.resolve()
