"""The backend on a Python without POSIX-only modules (Windows): it imports, logs, locks and probes.

Windows Pythons have no `resource` or `fcntl` module and, before 3.13, no `os.fchmod`; `os.kill(pid, 0)`
there is not a probe but a Ctrl+C sent to a process group. A child interpreter with those taken away
runs the code paths a `farslip serve` / `segment` / `--workers` start goes through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys
sys.modules["resource"] = None  # "import resource" raises ImportError, as on Windows
sys.modules["fcntl"] = None
del os.fchmod
import logging
from pathlib import Path
from backend.service import cli  # the whole command line imports
from backend.service.server.lifecycle import setup_logging
from backend.engine.memory import peak_rss_mb
import backend.scale.manifest
state = Path(sys.argv[1])
state.mkdir()
log_file = setup_logging(state)
logging.getLogger("farslip.server").warning("written on a Python without os.fchmod")
for handler in logging.getLogger().handlers:
    handler.flush()
print(json.dumps({"log": Path(log_file).read_text(), "peak": peak_rss_mb(), "cli": bool(cli.app)}))
"""


def test_backend_runs_without_posix_only_modules(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "state")], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "written on a Python without os.fchmod" in result["log"]
    assert result["peak"] >= 0 and result["cli"]


def test_manifest_lock_without_fcntl(tmp_path, monkeypatch):
    """A --workers run's partial folder still opens (no advisory lock) where fcntl does not exist."""
    from backend.scale import manifest

    monkeypatch.setitem(sys.modules, "fcntl", None)
    folder = tmp_path / "partial"
    folder.mkdir()
    holder = manifest.Manifest.__new__(manifest.Manifest)
    holder.folder, holder._lock = folder, None
    holder._take_lock()
    assert holder._lock is not None and (folder / "lock").exists()
    holder._lock.close()


def test_process_probe_on_windows_sends_no_signal(monkeypatch):
    """On Windows the probe asks psutil (which uses OpenProcess there), never os.kill(pid, 0)."""
    import psutil

    from backend.engine import temporary

    asked = []
    real = psutil.pid_exists
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: asked.append(pid) or real(pid))
    monkeypatch.setattr(temporary, "PROBE_BY_SIGNAL", False)  # as on Windows
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert temporary.process_is_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not temporary.process_is_alive(child.pid)
    assert asked == [child.pid, child.pid]


def test_log_file_still_private_on_posix(tmp_path):
    from backend.service.server.lifecycle import PrivateLogFile

    handler = PrivateLogFile(str(tmp_path / "server.log"))
    try:
        assert (tmp_path / "server.log").stat().st_mode & 0o777 == 0o600
    finally:
        handler.close()
