"""`farslip serve` across process deaths: kill -9 mid-job and restart, graceful SIGTERM, one server per state dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest


def _long_job(segment_body, out_dir):
    """The whole image upsampled 4x, one crop per batch: long enough to be caught mid-run."""
    return segment_body(out=str(out_dir / "long.gpkg"), bbox=None, scale=4.0, batch_size=1,
                        class_raster=str(out_dir / "long-classes.tif"))


def _wait_mid_run(backend, job_id):
    job = backend.wait(job_id, until=lambda job: job["tiles_done"] >= 3 or job["state"] not in
                       ("queued", "running"))
    assert job["state"] == "running", job
    return job


def test_kill_9_mid_job_then_restart_shows_it_interrupted_and_removes_its_partial_files(
        start_backend, segment_body, out_dir, tmp_path):
    state_dir = tmp_path / "state"
    backend = start_backend(state_dir)
    earlier = backend.submit(segment_body(out=str(out_dir / "earlier.gpkg")))
    assert backend.wait(earlier)["state"] == "done"
    before = sorted(p.name for p in out_dir.iterdir())
    long_id = backend.submit(_long_job(segment_body, out_dir))
    _wait_mid_run(backend, long_id)

    backend.stop(signal.SIGKILL)
    # The engine's scratch folder is still there: the dead process could not clean up.
    assert sorted(p.name for p in out_dir.iterdir()) != before
    with sqlite3.connect(state_dir / "jobs.sqlite") as db:
        assert db.execute("SELECT state FROM jobs WHERE id=?", (long_id,)).fetchone()[0] == "running"

    restarted = start_backend(state_dir)
    job = restarted.job(long_id)
    # DESIGN's five states: a client polling until done/failed/cancelled stops; nothing is lost (interrupted).
    assert job["state"] == "failed" and job["interrupted"] is True, job
    assert job["message"] == job["error"] == ("Interrupted: the backend stopped while this job was running; nothing "
                                              "was written. Run it again.")
    assert job["finished"]
    assert sorted(p.name for p in out_dir.iterdir()) == before
    listed = {j["id"]: j for j in restarted.client.get("/v1/jobs").json()["jobs"]}
    assert listed[earlier]["state"] == "done" and listed[earlier]["interrupted"] is False
    assert listed[earlier]["result"]["outputs"]["vector"] == str(out_dir / "earlier.gpkg")
    assert (listed[long_id]["state"], listed[long_id]["interrupted"]) == ("failed", True)
    # The restarted backend works.
    again = restarted.submit(segment_body(out=str(out_dir / "again.gpkg")))
    assert restarted.wait(again)["state"] == "done"


def test_sigterm_cancels_the_running_job_cleanly_and_removes_the_connection_file(
        start_backend, segment_body, out_dir, tmp_path):
    state_dir = tmp_path / "state"
    backend = start_backend(state_dir)
    long_id = backend.submit(_long_job(segment_body, out_dir))
    queued_id = backend.submit(segment_body(out=str(out_dir / "queued.gpkg")))
    _wait_mid_run(backend, long_id)

    assert backend.stop(signal.SIGTERM, timeout=30) == 0
    assert not backend.connection_file.exists()
    assert list(out_dir.iterdir()) == []
    assert "shutting down: cancelling the running job" in (tmp_path / "state-stderr.txt").read_text()

    restarted = start_backend(state_dir)
    for job_id in (long_id, queued_id):
        job = restarted.job(job_id)
        assert (job["state"], job["interrupted"]) == ("failed", True) and job["error"].startswith("Interrupted: "), job
    assert "before this job started" in restarted.job(queued_id)["error"]
    assert restarted.job(queued_id)["started"] is None


def test_post_shutdown_stops_the_backend_as_sigterm_does_and_only_with_the_token(
        start_backend, segment_body, out_dir, tmp_path):
    """What the plugin asks before it ends the process: on Windows QProcess.terminate() reaches no console
    program, so without it every stop was a kill after a 5 s freeze of QGIS."""
    backend = start_backend(tmp_path / "state")
    long_id = backend.submit(_long_job(segment_body, out_dir))
    _wait_mid_run(backend, long_id)
    refused = httpx.post(backend.url + "/v1/shutdown", timeout=10)
    assert refused.status_code == 401 and backend.process.poll() is None
    answer = backend.client.post("/v1/shutdown")
    assert (answer.status_code, answer.json()) == (202, {"status": "stopping"})
    assert backend.process.wait(60) == 0
    assert not backend.connection_file.exists()
    assert list(out_dir.iterdir()) == []
    assert "shutting down: cancelling the running job" in (tmp_path / "state-stderr.txt").read_text()


def test_sigint_on_an_idle_server_exits_and_removes_the_connection_file(start_backend, tmp_path):
    backend = start_backend(tmp_path / "state")
    assert backend.client.get("/v1/health").status_code == 200
    backend.stop(signal.SIGINT, timeout=30)
    assert not backend.connection_file.exists()


def test_a_backend_started_with_parent_pid_stops_when_that_process_ends(start_backend, tmp_path):
    """The QGIS plugin passes its own pid: a QGIS that crashed left its backend running, model in memory, for good."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        backend = start_backend(tmp_path / "state", "--parent-pid", str(parent.pid))
        assert backend.client.get("/v1/health").status_code == 200
    finally:
        parent.kill()
        parent.wait()
    assert backend.process.wait(90) == 0
    backend.stop()
    assert not backend.connection_file.exists()
    assert f"the process that started this backend (pid {parent.pid}) has ended" in (
        tmp_path / "state-stderr.txt").read_text()


def test_a_parent_pid_of_no_running_process_is_refused(serve_refusal, tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    code, stderr = serve_refusal("--state-dir", str(tmp_path / "state"), "--parent-pid",
                                    str(ended.pid))
    assert code == 2, stderr
    assert f"--parent-pid {ended.pid}: no such process is running" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_a_port_no_socket_can_have_is_refused_in_one_sentence(serve_refusal, tmp_path, port):
    """--port 99999 ended in bind()'s OverflowError traceback; --port -1 was blamed on --host."""
    code, stderr = serve_refusal("--state-dir", str(tmp_path / "state"), "--port", port)
    assert code == 2, stderr
    assert stderr.strip() == f"Error: --port must be a TCP port, 0 to 65535 (0 picks a free one); got {port}."


def test_a_second_server_on_the_same_state_dir_is_refused(start_backend, tmp_path):
    state_dir = tmp_path / "state"
    first = start_backend(state_dir)
    with pytest.raises(RuntimeError, match="exited"):
        start_backend(state_dir)
    assert first.client.get("/v1/health").status_code == 200
    log = (tmp_path / "state-stderr.txt").read_text()
    assert "Another farslip backend is already using the state directory" in log


@pytest.mark.parametrize("where", ["under-a-file", "a-folder", "proc"])
def test_an_unusable_connection_file_is_refused_before_the_server_starts(serve_refusal, tmp_path, where):
    state_dir = tmp_path / "state"
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "folder").mkdir()
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    connection_file = {"under-a-file": tmp_path / "file" / "conn.json", "a-folder": tmp_path / "folder",
                       "proc": Path("/proc/farslip/backend.json")}[where]
    code, stderr = serve_refusal("--state-dir", str(state_dir), "--connection-file",
                                    str(connection_file))
    assert code == 2, stderr
    assert f"Cannot write the connection file {connection_file}" in stderr
    assert "Traceback" not in stderr and "startup complete" not in stderr and "backend ready" not in stderr
    assert (tmp_path / "file").read_text() == "a regular file"
    assert list((tmp_path / "folder").iterdir()) == []
    assert not Path("/proc/farslip").exists()


def test_a_connection_file_whose_pid_is_another_process_and_whose_url_nothing_answers_on_is_replaced(
        start_backend, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    # The pid reused after a reboot or kill -9: this test's own process, alive and no backend.
    stale = {"url": f"http://127.0.0.1:{free_port}", "port": free_port, "token": "x", "pid": os.getpid(),
             "version": "0.1.0"}
    (state_dir / "conn.json").write_text(json.dumps(stale))
    backend = start_backend(state_dir)
    assert backend.client.get("/v1/health").status_code == 200
    assert "replacing the stale connection file" in (tmp_path / "state-stderr.txt").read_text()


def test_a_connection_file_of_a_backend_that_answers_is_kept(start_backend, serve_refusal, tmp_path):
    first = start_backend(tmp_path / "first")
    code, stderr = serve_refusal("--state-dir", str(tmp_path / "second"), "--connection-file",
                                    str(first.connection_file))
    assert code == 2, stderr
    assert "belongs to a backend that is running" in stderr
    assert first.client.get("/v1/health").status_code == 200


def test_shutdown_logs_cancelling_a_job_only_when_one_runs(start_backend, tmp_path):
    backend = start_backend(tmp_path / "state")
    assert backend.client.get("/v1/health").status_code == 200
    assert backend.stop(signal.SIGTERM, timeout=30) == 0
    log = (tmp_path / "state-stderr.txt").read_text()
    assert "shutting down" in log
    assert "cancelling the running job" not in log


@pytest.mark.parametrize("token", ["   ", "x", "pässwörd-pässwörd-pässwörd", "sixteen chars but spaces"])
def test_an_unusable_token_is_refused_at_startup(serve_refusal, tmp_path, token):
    code, stderr = serve_refusal("--state-dir", str(tmp_path / "state"), "--token", token)
    assert code == 2, stderr
    assert "The access token" in stderr and "visible ASCII" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("host", ["foo.invalid", "999.1.1.1"])
def test_a_host_that_cannot_be_listened_on_asks_for_another_host_without_the_network_warning(
        serve_refusal, tmp_path, host):
    code, stderr = serve_refusal("--state-dir", str(tmp_path / "state"), "--host", host)
    assert code == 2, stderr
    assert f"Cannot listen on {host}" in stderr and "--host" in stderr and "--port" not in stderr
    assert "other machines on the network" not in stderr


def test_the_backend_log_is_private_even_in_a_state_folder_made_before_and_after_a_rollover(tmp_path):
    """The log names the user's rasters and outputs: an earlier version left it (and its folder) readable by
    everyone on the machine when the state folder already existed."""
    import logging
    import stat

    from backend.service.server.lifecycle import setup_logging

    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True, mode=0o755)
    (state / "logs").chmod(0o755)
    old_log = state / "logs" / "backend.log"
    old_log.write_text("an earlier run's lines\n")
    old_log.chmod(0o644)
    log_file = setup_logging(state)
    logger = logging.getLogger("farslip")
    handler = next(h for h in logger.handlers if getattr(h, "baseFilename", None) == str(log_file))
    try:
        logger.info("job for /home/analyst/secret-site.tif")
        assert stat.S_IMODE(os.stat(state / "logs").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
        handler.doRollover()
        logger.info("after the rollover")
        assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(state / "logs" / "backend.log.1").st_mode) == 0o600
        assert "after the rollover" in log_file.read_text()
        assert "an earlier run's lines" in (state / "logs" / "backend.log.1").read_text()
    finally:
        for name in ("farslip", "uvicorn", "uvicorn.error"):
            logging.getLogger(name).propagate = True
            for h in list(logging.getLogger(name).handlers):
                logging.getLogger(name).removeHandler(h)
                if h is handler:
                    h.close()
