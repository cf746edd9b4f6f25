"""`farslip segment` stopped from outside (SIGTERM, SIGHUP), leftovers of dead runs, a full disk.

Real processes: the signal reaches the running command, the disk is a 2 MB tmpfs mounted in a
private mount namespace of the test (unshare), so nothing outside the test sees it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.crs
from typer.testing import CliRunner

from backend.engine.temporary import host_mark
from backend.service.cli import app

FARSLIP = Path(sys.executable).parent / "farslip"
BBOX = ["486500", "5206500", "488000", "5208000"]


def _long_run(naip: Path, tiny_model: Path, out_dir: Path) -> list[str]:
    """Hundreds of one-crop batches: long enough to be stopped mid-run."""
    return ["segment", str(naip), "-c", "water", "-c", "field", "--model", str(tiny_model), "--device", "cpu",
            "--scale", "4", "--batch-size", "1", "--out", str(out_dir / "r.gpkg"),
            "--class-raster", str(out_dir / "c.tif"), "--quiet"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_run_is_an_interruption_that_leaves_nothing(sig, code, start_cli, naip, tiny_model, out_dir):
    process = start_cli(*_long_run(naip, tiny_model, out_dir))
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".farslip-") for p in out_dir.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # into the crops
    process.send_signal(sig)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip().splitlines() == ["Interrupted; nothing was written."]
    assert list(out_dir.iterdir()) == []


def test_stale_temporary_files_of_dead_processes_go_those_of_live_ones_and_other_computers_stay(naip, tiny_model,
                                                                                                   out_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    try:
        dead_dir = out_dir / f".farslip-{dead.pid}-0123456789ab"
        dead_dir.mkdir()
        (dead_dir / "owner.json").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
        (dead_dir / "classes.tif").write_bytes(b"x" * 1000)
        dead_file = out_dir / f".old.gpkg.farslip-{dead.pid}-0123456789ab.tmp.gpkg"
        dead_file.write_text("half")
        live_dir = out_dir / f".farslip-{live.pid}-abcdef012345"
        live_dir.mkdir()
        live_file = out_dir / f".other.gpkg.farslip-{live.pid}-abcdef012345.tmp.gpkg"
        live_file.write_text("being written")
        users = [out_dir / ".farslip-notes", out_dir / ".farslip-1-x"]
        for path in users:
            path.write_text("not a temporary name of ours")
        # Tags name their computer now: this one's dead run goes; another computer's run in the same (network)
        # folder stays, whatever its pid means here (no owner file or journal content needed to tell).
        mine = out_dir / f".new.gpkg.farslip-{dead.pid}h{host_mark()}-0123456789ab.tmp.gpkg"
        mine.write_text("half")
        other = f"{dead.pid}h{host_mark('the-other-computer')}-00112233aabb"
        theirs = [out_dir / f".a.gpkg.farslip-{other}.tmp.gpkg", out_dir / f".farslip-{other}",
                  out_dir / f".farslip-{other}.commit.json"]
        theirs[0].write_text("being written there")
        theirs[1].mkdir()
        theirs[2].write_text("{}")

        result = CliRunner().invoke(app, ["segment", str(naip), "-c", "water", "--model", str(tiny_model),
                                          "--device", "cpu", "--bbox", *BBOX, "--out", str(out_dir / "r.gpkg"),
                                          "--quiet"])
        assert result.exit_code == 0, result.output
        assert not dead_dir.exists() and not dead_file.exists() and not mine.exists()
        assert live_dir.is_dir() and live_file.read_text() == "being written"
        assert all(path.exists() for path in users)
        assert theirs[0].read_text() == "being written there" and theirs[1].is_dir() and theirs[2].read_text() == "{}"
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(
            [live_dir.name, live_file.name, *(p.name for p in users), *(p.name for p in theirs), "r.gpkg",
             "r.report.json"])
    finally:
        live.kill()
        live.wait()


def _in_small_disk(folder: Path, command: list[str], env: dict[str, str], size: str = "2m"
                   ) -> subprocess.CompletedProcess:
    """Run `command` with a tmpfs of `size` mounted on `folder` (private to the command); prints what is left."""
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    script = (f'mount -t tmpfs -o size={size} tmpfs "$0" || exit 99; "$@"; code=$?; '
              'echo "left: $(ls -A "$0" | tr "\\n" " ")"; exit $code')
    return subprocess.run([*namespace, "sh", "-c", script, str(folder), *command], capture_output=True, text=True,
                          env=env, timeout=300)


# Five ways a run meets the small disk (2 MB unless said): rasters that do not fit (found while
# writing, or estimated before starting), polygons that do not fit (streamed beside the engine: the
# polygon layer is the only file; or made from work files, with --refine edges), a shapefile.
DISK_CASES = {
    "probability raster while writing": ["--bbox", *BBOX, "--prob-raster", "{disk}/p.tif", "--out", "{other}/r.gpkg",
                                         "--scale", "2"],
    "rasters estimated before starting": ["--prob-raster", "{disk}/p.tif", "--out", "{disk}/r.gpkg", "--scale", "8"],
    "polygons": ["--out", "{disk}/r.gpkg", "--scale", "2", "size=256k"],
    "polygons and work files": ["--out", "{disk}/r.gpkg", "--scale", "2", "--refine", "edges"],
    "shapefile and class raster": ["--out", "{disk}/r.shp", "--class-raster", "{disk}/c.tif", "--scale", "2",
                                   "size=256k"],
}


@pytest.mark.parametrize("case", DISK_CASES)
def test_a_full_disk_is_one_sentence_and_leaves_nothing(case, naip, tiny_model, tmp_path, env):
    disk, other = tmp_path / "small-disk", tmp_path / "other"
    disk.mkdir()
    other.mkdir()
    words = DISK_CASES[case]
    size = next((word.removeprefix("size=") for word in words if word.startswith("size=")), "2m")
    options = [word.format(disk=disk, other=other) for word in words if not word.startswith("size=")]
    run = _in_small_disk(disk, [str(FARSLIP), "segment", str(naip), "-c", "water", "-c", "field", "-c", "road",
                                "--model", str(tiny_model), "--device", "cpu", "--quiet", *options], env, size)
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    # libtiff prints "_tiffWriteProc: No space left on device." itself, past GDAL; ours is the last line.
    assert lines[-1].startswith(f"Error: Not enough space on the disk for {disk}/"), run.stderr
    assert "MB)" in lines[-1] and "Traceback" not in run.stderr
    assert all(line.startswith("_tiff") for line in lines[:-1]), run.stderr
    assert run.stdout.strip() == "left:"
    assert list(other.iterdir()) == []


STOP_AT_IMPORT = """
import importlib.abc, os, sys
class StopHere(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == sys.argv[1]:
            os.kill(os.getpid(), int(sys.argv[2]))
        return None
sys.meta_path.insert(0, StopHere())
from backend.engine.temporary import host_mark
from backend.service.cli import app
app(sys.argv[3:], prog_name="farslip")
"""


@pytest.mark.parametrize("module, sig, code, command, said", [
    ("backend.engine.classify", signal.SIGINT, 130,
     ["classify", "RASTER", "-c", "water", "-c", "road", "--model", "MODEL", "--out", "OUT/r.gpkg"],
     "Interrupted; nothing was written."),
    ("backend.engine.retrieval", signal.SIGTERM, 143, ["evaluate-retrieval", "OUT", "--model", "MODEL"],
     "Interrupted."),
    # train imports them once its options, --out, labels and raster are checked, inside its own handling.
    ("training.api", signal.SIGHUP, 129,
     ["train", "RASTER", "LABELS", "--class-field", "building", "--base-model", "MODEL", "--out", "OUT/m"],
     "Interrupted before an epoch finished; no model was written and nothing was kept (run the command again to "
     "start over)."),
], ids=["Ctrl+C in classify", "SIGTERM in evaluate-retrieval", "SIGHUP in train"])
def test_a_signal_while_a_command_still_imports_is_one_line(module, sig, code, command, said, naip, tiny_model,
                                                            out_dir, shared_data):
    """The first seconds of a run import torch and the engine: a signal there was a silent exit 130
    (Ctrl+C) or a process killed with no line (SIGTERM, SIGHUP). classify imports them once its raster is
    checked, inside its own handling of a signal, which says nothing was written."""
    values = {"RASTER": str(naip), "MODEL": str(tiny_model), "OUT": str(out_dir),
              "LABELS": str(shared_data / "solaris_geotiff_labels.geojson")}
    args = [values.get(a.split("/")[0], a.split("/")[0]) + a[len(a.split("/")[0]):] for a in command]
    done = subprocess.run([sys.executable, "-c", STOP_AT_IMPORT, module, str(int(sig)), *args], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == [said]
    assert list(out_dir.iterdir()) == []


def test_a_quiet_run_prints_nothing_from_gdal_or_proj(env, shared_data, tiny_model, tmp_path):
    """A successful --quiet run says nothing: GDAL printed 'Warning 1: RowsPerStrip not defined' for a shared
    sample (from a reader thread), and a CRS in kilometres printed PROJ's 'Cannot find proj.db' twice."""
    km = tmp_path / "km.tif"
    with rasterio.open(km, "w", driver="GTiff", width=120, height=90, count=3, dtype="uint8",
                       crs=rasterio.crs.CRS.from_proj4("+proj=utm +zone=33 +ellps=WGS84 +units=km +no_defs"),
                       transform=rasterio.Affine(0.002, 0, 500, 0, -0.002, 6000)) as ds:
        ds.write(np.random.default_rng(0).integers(0, 255, (3, 90, 120), dtype=np.uint8))
    for raster in (shared_data / "deepness_dummy_fotomap_small.tif", km):
        done = subprocess.run([str(FARSLIP), "segment", str(raster), "-c", "soil", "-c", "maize", "--model",
                               str(tiny_model), "--device", "cpu", "--out", str(tmp_path / f"{raster.stem}.gpkg"),
                               "--no-region-checks", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and done.stderr == "" and done.stdout == "", (raster.name, done.stderr)
