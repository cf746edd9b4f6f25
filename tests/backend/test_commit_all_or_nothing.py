"""A run's outputs land together or not at all.

They are staged, then renamed into place, the data first and the run report (the marker of a finished run)
last. A rename that fails on the way (a name taken by a folder meanwhile, a folder that stops taking files, a
full disk) undoes the renames before it: no report is left without its data, no part of a shapefile alone, no
new file beside old ones, and a result being replaced (--overwrite) is still there, byte for byte. The
failures here are real ones at the commit step: os.replace failing on its Nth call in the output folder, a
folder put at an output's name between staging and commit.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
from tinymodels import make_tiny_clip, save_plain
from training_data import fast_options, make_synthetic
from typer.testing import CliRunner

from backend.engine import atomic
from backend.engine.atomic import StagedOutputs, backup_path
from backend.engine.classify import ClassifyOptions, classify_raster
from backend.engine.errors import InputError
from backend.engine.models import load_model
from backend.engine.search import search_raster
from backend.engine.search_queries import SearchOptions
from backend.engine.search_index import open_index
from backend.service.cli import app

runner = CliRunner()
CLASSES = ["-c", "water, lake", "-c", "cropland, bare field", "-c", "grassland"]


class FailingRename:
    """os.replace, failing once: on its `nth` call whose destination lies in `folder`, or on the first whose
    destination `when` picks (other folders, such as the feature cache's, are left alone)."""

    def __init__(self, monkeypatch, folder: Path, nth: int | None = None, when=None, code: int = errno.EACCES,
                 error: type[BaseException] = OSError):
        self.folder, self.nth, self.when, self.code, self.error = Path(folder), nth, when, code, error
        self.real, self.calls, self.failed = os.replace, 0, False
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, src, dst, **kwargs):
        if Path(os.path.abspath(dst)).parent == self.folder:
            self.calls += 1
            if not self.failed and (self.calls == self.nth or (self.when is not None and self.when(Path(dst)))):
                self.failed = True
                if self.error is OSError:
                    raise OSError(self.code, os.strerror(self.code), str(src), None, str(dst))
                raise self.error()
        return self.real(src, dst, **kwargs)


def commit_failing_each_rename(tmp_path: Path, monkeypatch, links: bool, lay_out, stage, snapshot,
                               limit: int = 40) -> tuple[Path, int]:
    """Stage and commit a run in a fresh folder laid out by `lay_out(folder)`, with rename 1, 2, ... of the
    commit failing, until a commit goes through; after each failed one the folder's `snapshot` must be what it
    was before. Without `links`, as on a file system without hard links. The last folder and its count."""
    if not links:  # a file system without hard links (FAT, some network shares): replaced files are renamed aside
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    for nth in itertools.count(1):
        assert nth < limit, "the commit never ended"
        folder = tmp_path / f"run{nth}"
        folder.mkdir()
        lay_out(folder)
        before = snapshot(folder)
        outputs = stage(folder, f"{os.getpid()}-{nth:08x}")
        with monkeypatch.context() as patch:
            failing = FailingRename(patch, folder, nth=nth)
            try:
                with outputs:
                    outputs.commit()
            except OSError as error:
                assert failing.failed and error.errno == errno.EACCES
                assert snapshot(folder) == before, f"rename {nth} failed: the folder changed"
                continue
        assert not failing.failed
        return folder, nth
    raise AssertionError("unreachable")


def recorded_renames(monkeypatch) -> list[str]:
    """The names os.replace renames to from now on, in order (the renames still happen)."""
    order: list[str] = []
    real = os.replace

    def recording(src, dst, **kwargs):
        order.append(Path(dst).name)
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", recording)
    return order


def files(folder: Path) -> dict[str, bytes]:
    """Every entry of `folder` by name, a file by its bytes (a folder as b'<folder>')."""
    return {p.name: (b"<folder>" if p.is_dir() else p.read_bytes()) for p in folder.iterdir()}


# --------------------------------------------------------------------------- the commit itself

PREVIOUS = {"hits.shp": b"old shp", "hits.shx": b"old shx", "hits.dbf": b"old dbf", "hits.prj": b"old prj",
            "hits.qix": b"old index", "classes.tif": b"old tif", "hits.report.json": b'{"run_id": "old"}',
            "hits.gpkg-wal": b"unrelated"}


def stage_run(folder: Path, tag: str) -> StagedOutputs:
    """A run's outputs staged: a shapefile (no .qix: the old one is stale), a GeoTIFF with its .aux.xml, a
    report."""
    outputs = StagedOutputs({"class_raster": folder / "classes.tif", "vector": folder / "hits.shp",
                             "report": folder / "hits.report.json"}, tag)
    for suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
        outputs["vector"].with_suffix(suffix).write_bytes(f"new {suffix}".encode())
    outputs["class_raster"].write_bytes(b"new tif")
    outputs["class_raster"].with_name(outputs["class_raster"].name + ".aux.xml").write_bytes(b"new aux")
    outputs["report"].write_bytes(b'{"run_id": "new"}')
    return outputs


NEW = {"hits.shp": b"new .shp", "hits.shx": b"new .shx", "hits.dbf": b"new .dbf", "hits.prj": b"new .prj",
       "hits.cpg": b"new .cpg", "classes.tif": b"new tif", "classes.tif.aux.xml": b"new aux",
       "hits.report.json": b'{"run_id": "new"}', "hits.gpkg-wal": b"unrelated"}


@pytest.mark.parametrize("previous", [PREVIOUS, {}], ids=["over-a-previous-result", "fresh"])
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_rename_failing_at_any_step_leaves_the_folder_as_it_was(tmp_path, monkeypatch, previous, links):
    def lay_out(folder):
        for name, data in previous.items():
            (folder / name).write_bytes(data)

    folder, nth = commit_failing_each_rename(tmp_path, monkeypatch, links, lay_out, stage_run, files)
    # The new result, without the stale .qix of the old shapefile; the journal of another file stays.
    assert files(folder) == {k: v for k, v in NEW.items() if k != "hits.gpkg-wal" or previous}
    # Each rename failed once: a shapefile of 5 parts, a GeoTIFF and its .aux.xml, a report (and the .qix).
    assert nth - 1 >= 8


def test_the_report_is_renamed_in_last(tmp_path, monkeypatch):
    order = recorded_renames(monkeypatch)
    with stage_run(tmp_path, f"{os.getpid()}-00000001"):
        pass
    placed = [name for name in order if not name.endswith(".bak")]
    assert placed[-1] == "hits.report.json" and placed.index("classes.tif") < placed.index("hits.shp")
    assert sorted(files(tmp_path)) == sorted(k for k in NEW if k != "hits.gpkg-wal")


def test_a_folder_created_at_the_report_name_before_the_commit_undoes_the_data(tmp_path):
    for name, data in PREVIOUS.items():
        (tmp_path / name).write_bytes(data)
    outputs = stage_run(tmp_path, f"{os.getpid()}-00000002")
    (tmp_path / "hits.report.json").unlink()
    (tmp_path / "hits.report.json").mkdir()  # between staging and commit
    with pytest.raises(OSError), outputs:
        outputs.commit()
    assert files(tmp_path) == {**{k: v for k, v in PREVIOUS.items() if k != "hits.report.json"},
                               "hits.report.json": b"<folder>"}


def test_an_interruption_in_the_middle_of_the_commit_undoes_it(tmp_path, monkeypatch):
    for name, data in PREVIOUS.items():
        (tmp_path / name).write_bytes(data)
    outputs = stage_run(tmp_path, f"{os.getpid()}-00000003")
    FailingRename(monkeypatch, tmp_path, nth=5, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt), outputs:
        outputs.commit()
    assert files(tmp_path) == PREVIOUS


def test_an_undo_that_fails_too_says_where_the_previous_file_is_kept(tmp_path, monkeypatch):
    for name, data in PREVIOUS.items():
        (tmp_path / name).write_bytes(data)
    tag = f"{os.getpid()}-00000004"
    outputs = stage_run(tmp_path, tag)
    real = os.replace

    def failing(src, dst, **kwargs):
        if Path(dst).name == "hits.report.json" or Path(src).name == backup_path("hits.shp", tag).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src), None, str(dst))
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(InputError) as raised, outputs:
        outputs.commit()
    sentence = str(raised.value)
    assert "undoing it failed too" in sentence and str(backup_path(tmp_path / "hits.shp", tag)) in sentence
    assert "\n" not in sentence
    assert backup_path(tmp_path / "hits.shp", tag).read_bytes() == b"old shp"  # the previous file is there
    # Everything else is back as it was.
    assert {k: v for k, v in files(tmp_path).items() if k not in ("hits.shp", backup_path("hits.shp", tag).name)} \
        == {k: v for k, v in PREVIOUS.items() if k != "hits.shp"}


def test_a_single_file_is_replaced_with_one_rename_and_no_backup(tmp_path, monkeypatch):
    """Caches and state files (one file each) pay nothing for the undo: one rename, no hard link."""
    target = tmp_path / "state.json"
    target.write_text("old")
    calls: list[str] = []
    real_replace, real_link = os.replace, os.link
    monkeypatch.setattr(os, "replace", lambda *a, **k: calls.append("replace") or real_replace(*a, **k))
    monkeypatch.setattr(os, "link", lambda *a, **k: calls.append("link") or real_link(*a, **k))
    atomic.write_text_atomically(target, "new")
    assert calls == ["replace"] and files(tmp_path) == {"state.json": b"new"}


# --------------------------------------------------------------------------- the commands

def segment(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


def layer_run_ids(path: Path) -> set[str]:
    meta, _, _, fields = pyogrio.raw.read(path)
    return set(fields[list(meta["fields"]).index("run_id")])


def sentence(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_segment_over_a_previous_result_keeps_it_whole_when_the_report_cannot_be_put_in_place(
        tiny_model, shared_data, tmp_path, monkeypatch):
    out, classes, probs = tmp_path / "r.gpkg", tmp_path / "classes.tif", tmp_path / "probs.tif"
    args = [shared_data / "RGBA.uint16.tif", *CLASSES, "--model", tiny_model, "--out", out, "--class-raster",
            classes, "--prob-raster", probs, "--quiet", "--overwrite"]
    first = segment(*args)
    assert first.exit_code == 0, first.output
    before = files(tmp_path)
    old_run = json.loads((tmp_path / "r.report.json").read_text())["run_id"]
    assert layer_run_ids(out) == {old_run}
    failing = FailingRename(monkeypatch, tmp_path, when=lambda dst: dst.name == "r.report.json")
    second = segment(*args)
    assert failing.failed and second.exit_code == 2
    assert "r.report.json" in sentence(second) and "Permission denied" in sentence(second)
    assert files(tmp_path) == before  # the rasters and the polygons renamed before the report are the old ones
    assert layer_run_ids(out) == {old_run}


@pytest.mark.parametrize("fails", ["classes.tif", "r.shp", "r.report.json"])
def test_segment_to_a_shapefile_leaves_nothing_when_an_output_cannot_be_put_in_place(
        tiny_model, shared_data, tmp_path, monkeypatch, fails):
    """A folder put at an output's name after the run was checked (another program, another run): the outputs
    renamed before it go again, no shapefile part is left alone."""
    folder = tmp_path / "out"
    folder.mkdir()
    real_commit = atomic.commit_outputs

    def folder_in_the_way(staged, tag, durable=True, keep=()):
        if any(Path(target).parent == folder for target in staged.values()) and not (folder / fails).exists():
            (folder / fails).mkdir()
        return real_commit(staged, tag, durable, keep)

    monkeypatch.setattr(atomic, "commit_outputs", folder_in_the_way)
    result = segment(shared_data / "RGBA.uint16.tif", *CLASSES, "--model", tiny_model, "--out", folder / "r.shp",
                     "--class-raster", folder / "classes.tif", "--quiet")
    assert result.exit_code == 2 and fails in sentence(result)
    assert files(folder) == {fails: b"<folder>"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(save_plain(make_tiny_clip(seed=5), tmp_path_factory.mktemp("model") / "tiny.pt")),
                      device="cpu")


def small_raster(path: Path, size: int = 240) -> Path:
    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": rasterio.transform.from_origin(500000, 4100000, 2, 2)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    return path


def test_classify_on_a_full_disk_at_the_commit_keeps_the_previous_tiles_and_report(loaded, tmp_path, monkeypatch):
    raster = small_raster(tmp_path / "r.tif")
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "tiles.shp"
    options = ClassifyOptions(["water", "field"], tile=64)
    first = classify_raster(raster, options, out, loaded)
    before = files(folder)
    FailingRename(monkeypatch, folder, when=lambda dst: dst.name == "tiles.report.json", code=errno.ENOSPC)
    with pytest.raises(InputError, match="Not enough space on the disk"):
        classify_raster(raster, options, out, loaded, overwrite=True)
    assert files(folder) == before
    assert json.loads((folder / "tiles.report.json").read_text())["run_id"] == first.run_id


def test_search_whose_report_cannot_be_put_in_place_writes_no_hits(loaded, tmp_path, monkeypatch):
    raster = small_raster(tmp_path / "r.tif", 230)
    folder = tmp_path / "out"
    folder.mkdir()
    FailingRename(monkeypatch, folder, when=lambda dst: dst.name == "hits.report.json")
    with open_index(raster, loaded) as index:
        with pytest.raises(InputError, match=r"Cannot write .*hits\.report\.json \(Permission denied\)"):
            search_raster(index, SearchOptions(["a lake"], top=3), folder / "hits.gpkg")
    assert files(folder) == {}


@pytest.mark.parametrize("fails", ["m.json", "m.png"])
def test_evaluate_report_files_land_both_or_neither(tmp_path, monkeypatch, fails):
    from training.api import write_report

    metrics = {"confusion": [[3, 1], [0, 4]], "class_names": ["a", "b"], "miou": 0.5}
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    write_report({"metrics": metrics, "text": "x", "run": 1}, out_json, out_png, "")
    before = files(tmp_path)
    failing = FailingRename(monkeypatch, tmp_path, when=lambda dst: dst.name == fails)
    with pytest.raises(InputError, match=rf"Cannot write .*{fails}"):
        write_report({"metrics": metrics, "text": "x", "run": 2}, out_json, out_png, "")
    assert failing.failed and files(tmp_path) == before
    assert json.loads(out_json.read_text())["run"] == 1


def test_train_keeps_the_previous_model_when_its_json_report_cannot_be_put_in_place(tiny_model, tmp_path,
                                                                                   monkeypatch):
    (tmp_path / "data").mkdir()
    raster, labels, _ = make_synthetic(tmp_path / "data")
    folder = tmp_path / "models"
    folder.mkdir()
    out, report = folder / "model", folder / "train.json"

    def train(**changes):
        from training.api import train_model

        return train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=1, lr=1e-3,
                           options=fast_options(steps_per_epoch=2), out_json=report, **changes)

    first = train()
    before = {"model": files(out), "folder": sorted(os.listdir(folder)), "report": report.read_bytes()}
    assert json.loads(report.read_text())["model_dir"] == str(out) == first["model_dir"]
    with monkeypatch.context() as patch:
        failing = FailingRename(patch, folder, when=lambda dst: dst.name == "train.json")
        with pytest.raises(InputError, match="--resume to put it in place") as raised:
            train(overwrite=True)
        assert failing.failed and "\n" not in str(raised.value)
    assert files(out) == before["model"] and report.read_bytes() == before["report"]
    assert sorted(os.listdir(folder)) == sorted([*before["folder"], ".model.partial"])  # the trained model
    second = train(resume=True)  # as the sentence says: puts the trained model in place, with its report
    assert json.loads(report.read_text())["metrics"] == second["metrics"]
    assert sorted(os.listdir(folder)) == before["folder"]
