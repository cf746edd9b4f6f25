"""A folder among a run's outputs (a VRT mosaic's <name>_rasters) lands with the others or not at all.

StagedOutputs takes a folder written at its staged name; the commit renames the old folder aside and the new
one in, and a rename failing at any later step (the VRT, the report) puts the old folder back, with every file
in it, byte for byte. The failures are real ones at the commit step, as in test_commit_all_or_nothing.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_commit_all_or_nothing import FailingRename, commit_failing_each_rename, recorded_renames

from backend.engine.atomic import StagedOutputs


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by its path relative to it (a folder as b'<folder>')."""
    return {p.relative_to(folder).as_posix(): (b"<folder>" if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


PREVIOUS = {"c.vrt": b"old vrt", "c_rasters/a.tif": b"old a", "c_rasters/sub/b.tif": b"old b",
            "c_rasters/a.tif.aux.xml": b"old stats", "h.report.json": b'{"run_id": "old"}'}
NEW = {"c.vrt": b"new vrt", "c_rasters/a.tif": b"new a", "c_rasters/sub/b.tif": b"new b",
       "h.report.json": b'{"run_id": "new"}'}


def lay_out(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def stage_run(folder: Path, tag: str) -> StagedOutputs:
    outputs = StagedOutputs({"class_rasters": folder / "c_rasters", "class_raster": folder / "c.vrt",
                             "report": folder / "h.report.json"}, tag)
    staged_folder = outputs["class_rasters"]
    (staged_folder / "sub").mkdir(parents=True)
    (staged_folder / "a.tif").write_bytes(b"new a")
    (staged_folder / "sub" / "b.tif").write_bytes(b"new b")
    outputs["class_raster"].write_bytes(b"new vrt")
    outputs["report"].write_bytes(b'{"run_id": "new"}')
    return outputs


def expected(files: dict[str, bytes]) -> dict[str, bytes]:
    """`files` as tree() reads them back, with their folders."""
    found = dict(files)
    for name in files:
        for parent in Path(name).parents[:-1]:
            found[parent.as_posix()] = b"<folder>"
    return dict(sorted(found.items()))


@pytest.mark.parametrize("previous", [PREVIOUS, {}], ids=["over-a-previous-result", "fresh"])
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_rename_failing_at_any_step_leaves_the_folder_output_as_it_was(tmp_path, monkeypatch, previous, links):
    folder, nth = commit_failing_each_rename(tmp_path, monkeypatch, links, lambda f: lay_out(f, previous), stage_run,
                                             tree, limit=20)
    # The new folder whole (the old one's stale .aux.xml gone with it), no backup left.
    assert tree(folder) == expected(NEW)
    assert nth - 1 >= 3  # the folder, the VRT, the report (and the old folder set aside) each failed once


def test_the_folder_goes_in_before_its_vrt_and_the_report_last(tmp_path, monkeypatch):
    lay_out(tmp_path, PREVIOUS)
    order = recorded_renames(monkeypatch)
    with stage_run(tmp_path, f"{os.getpid()}-00000001"):
        pass
    placed = [name for name in order if not name.endswith(".bak")]
    assert placed == ["c_rasters", "c.vrt", "h.report.json"]
    assert tree(tmp_path) == expected(NEW)


def test_an_interruption_after_the_folder_is_in_puts_the_old_folder_back(tmp_path, monkeypatch):
    lay_out(tmp_path, PREVIOUS)
    outputs = stage_run(tmp_path, f"{os.getpid()}-00000002")
    FailingRename(monkeypatch, tmp_path, when=lambda dst: dst.name == "h.report.json", error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt), outputs:
        outputs.commit()
    assert tree(tmp_path) == expected(PREVIOUS)


def test_a_failed_run_removes_its_staged_folder(tmp_path):
    lay_out(tmp_path, PREVIOUS)
    with pytest.raises(RuntimeError), stage_run(tmp_path, f"{os.getpid()}-00000003"):
        raise RuntimeError("the run failed before its commit")
    assert tree(tmp_path) == expected(PREVIOUS)
