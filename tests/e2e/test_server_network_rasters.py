"""A network raster (/vsicurl/) whose server accepts connections and never answers: the request's check
gives up with a sentence, and the backend keeps answering meanwhile (a real server on 127.0.0.1)."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import quote

import httpx
import pytest


@pytest.fixture
def silent_server():
    """A TCP listener on 127.0.0.1 that accepts every connection and never sends a byte; yields
    (port, number of connections accepted so far)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # the listener was closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], lambda: len(accepted)
    listener.close()
    for connection in accepted:
        connection.close()


def test_a_network_raster_that_never_answers_is_a_400_and_health_keeps_answering(backend, segment_body, out_dir,
                                                                               silent_server):
    port, connections = silent_server
    # One: its check holds a request thread for reads of 5 s each. (45, more than the pool of 40 request
    # threads, starved /v1/health before it had threads of its own; that many, or even 3, made the test a
    # matter of the machine's load, so it checks the mechanism with one.)
    requests = 1
    answers: dict[int, httpx.Response | Exception] = {}

    def submit(n: int) -> None:
        url = quote(f"http://127.0.0.1:{port}/scene{n}.tif", safe="")
        try:
            answers[n] = backend.client.post("/v1/segment", json=segment_body(
                raster=f"/vsicurl?url={url}", out=str(out_dir / f"r{n}.gpkg"), bbox=None), timeout=300)
        except Exception as error:  # recorded and asserted below
            answers[n] = error

    threads = [threading.Thread(target=submit, args=(n,), daemon=True) for n in range(requests)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while connections() < 1:  # the check is waiting on the silent server now
        assert time.monotonic() < deadline, "the checks never reached the network raster's server"
        time.sleep(0.05)
    health = backend.client.get("/v1/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for thread in threads:
        thread.join(300)
    assert len(answers) == requests
    for n, answer in answers.items():
        assert isinstance(answer, httpx.Response), f"request {n}: {answer!r}"
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert "did not answer within 5 s" in detail and "GDAL_HTTP_TIMEOUT" in detail, detail
    queued = backend.client.get("/v1/jobs").json()["jobs"]
    assert not any(job["request"]["raster"].startswith("/vsicurl") for job in queued)
