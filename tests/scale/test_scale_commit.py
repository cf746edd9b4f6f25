"""A scaled run's outputs are renamed in together, each <name>_rasters folder before its VRT and the report
last, all or nothing: a rename failing at the commit (a real os.replace failure in the output folder) leaves
the previous layer, VRTs, their folders and report byte for byte, and no report of the run that did not land.
Tiny rasters, one local Ray worker."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from test_scale_outputs import run_segment, write_image

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`


class FailingRename:
    """os.replace failing once, on the first call whose destination in `folder` is named `name`."""

    def __init__(self, monkeypatch, folder: Path, name: str):
        self.folder, self.name, self.real, self.failed = folder, name, os.replace, False
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, src, dst, **kwargs):
        dst_path = Path(os.path.abspath(dst))
        if not self.failed and dst_path.parent == self.folder and dst_path.name == self.name:
            self.failed = True
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
        return self.real(src, dst, **kwargs)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (b"<folder>" if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if "h.gpkg.partial" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def first_run(local_ray, tiny_model, tmp_path_factory) -> Path:
    """Two rasters segmented into a folder of their own: the previous result."""
    folder = tmp_path_factory.mktemp("first") / "run"
    write_image(folder / "in" / "a.tif", 500000, 1)
    write_image(folder / "in" / "b.tif", 500200, 2)
    result = run_segment([folder / "in"], folder, tiny_model)
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("fails", ["h.report.json", "p.vrt", "c_rasters"])
def test_a_rename_failing_at_the_commit_leaves_the_previous_result_whole(first_run, tiny_model, tmp_path,
                                                                        monkeypatch, fails):
    folder = tmp_path / "run"
    shutil.copytree(first_run, folder, symlinks=True)
    (folder / "p_rasters" / "a.tif.aux.xml").write_text("<PAMDataset/>")  # gdalinfo -stats, QGIS
    before = tree(folder)
    old_run = json.loads((folder / "h.report.json").read_text())["run_id"]
    with monkeypatch.context() as patch:
        failing = FailingRename(patch, folder, fails)
        result = run_segment([folder / "in"], folder, tiny_model, "-c", "road", "--overwrite")
    assert failing.failed, f"{fails} was never renamed in"
    assert result.exit_code == 2, result.output
    assert fails in result.output and "Permission denied" in result.output
    assert tree(folder) == before  # every old output, the VRTs' folders whole; no temporary or backup left
    assert json.loads((folder / "h.report.json").read_text())["run_id"] == old_run

    if fails != "h.report.json":
        return
    # The same command again puts the run in place (its finished rasters resumed).
    again = run_segment([folder / "in"], folder, tiny_model, "-c", "road", "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((folder / "h.report.json").read_text())["run_id"] != old_run
    assert sorted(p.name for p in (folder / "p_rasters").iterdir()) == ["a.tif", "b.tif"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
