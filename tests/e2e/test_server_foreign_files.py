"""`farslip serve` and files that are not its own: a file at --connection-file that is not a FarSLIP connection
file is refused and kept (it was replaced by the connection JSON, then deleted at shutdown); a start refused for
its --device, --host or --port leaves a fresh --state-dir unmade (it held jobs.sqlite, backend.lock and logs/)."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest


def _refusal(start_cli, *args: str) -> tuple[int, str]:
    """`farslip serve --port 0 ARGS` that must refuse to start (a start is a few seconds: killed after 40)."""
    process = start_cli("serve", "--port", "0", *args)
    try:
        _, stderr = process.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"farslip serve {' '.join(args)} started instead of refusing: {stderr}")
    return process.returncode, stderr


NOT_OURS = {
    "text": "precious\n",
    "empty": "",  # ours is written atomically: an empty file is never one of ours cut short
    "other JSON": json.dumps({"a": 1}),
    "a JSON list": "[1, 2]",
    "no pid": json.dumps({"url": "http://127.0.0.1:1", "port": 1, "token": "x"}),
    "pid not a number": json.dumps({"url": "http://127.0.0.1:1", "port": 1, "token": "x", "pid": "12"}),
    "binary": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("case", NOT_OURS)
def test_a_file_that_is_not_a_connection_file_is_refused_and_kept(start_cli, tmp_path, case):
    mine = tmp_path / "exist.json"
    content = NOT_OURS[case]
    if isinstance(content, bytes):
        mine.write_bytes(content)
    else:
        mine.write_text(content)
    before = mine.read_bytes()
    state_dir = tmp_path / "state"
    code, stderr = _refusal(start_cli, "--state-dir", str(state_dir), "--connection-file", str(mine))
    assert code == 2, stderr
    assert stderr.strip() == (f"Error: The connection file {mine} exists and is not a FarSLIP connection file (a "
                              "JSON object with url, port, token, pid), so it is left as it is; give "
                              "--connection-file another path.")
    assert mine.read_bytes() == before
    assert not state_dir.exists()


def test_a_stale_connection_file_of_a_backend_that_ended_is_still_replaced(start_backend, tmp_path):
    ended = subprocess.Popen(["true"])
    ended.wait()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "conn.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "port": 9, "token": "x",
                                                     "pid": ended.pid, "version": "0.1.0"}))
    backend = start_backend(state_dir)
    assert backend.client.get("/v1/health").status_code == 200
    assert json.loads(backend.connection_file.read_text())["pid"] == backend.process.pid


@pytest.fixture
def port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield str(taken.getsockname()[1])


@pytest.mark.parametrize("option, said", [
    ("--device", "Error: Unknown device 'tpu'. Use auto, cpu, cuda or mps."),
    ("--host", "Error: Cannot listen on foo.invalid"),
    ("--port", "Address already in use. Choose another --port"),
])
def test_a_refused_device_host_or_port_leaves_no_state_folder(start_cli, tmp_path, port_in_use, option, said):
    value = {"--device": "tpu", "--host": "foo.invalid", "--port": port_in_use}[option]
    state_dir = tmp_path / "fresh" / "state"
    code, stderr = _refusal(start_cli, "--state-dir", str(state_dir), option, value)
    assert code == 2, stderr
    assert said in stderr and "Traceback" not in stderr, stderr
    assert not state_dir.exists() and not (tmp_path / "fresh").exists()


def test_a_refused_port_leaves_an_existing_state_folder_as_it_was(start_cli, tmp_path, port_in_use):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    code, stderr = _refusal(start_cli, "--state-dir", str(state_dir), "--port", port_in_use)
    assert code == 2, stderr
    assert os.listdir(state_dir) == []
