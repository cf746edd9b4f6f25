"""A damaged <out>.partial/ folder of a scaled run: what it kept but cannot give back (an empty block file, an
empty polygon layer of a finished raster, manifest lines that are not the run's) is computed again by the same
command; a block whose data is damaged past its table of contents is one sentence naming it, exit 2, and the
next run computes that part again. Tiny rasters, one local Ray worker."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
from test_scale_outputs import run_segment, write_image

from backend.engine.errors import InputError
from backend.scale.manifest import Manifest, partial_folder

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`


class FailingReportRename:
    """os.replace failing once, when the run's report is renamed in: the run stops at its commit and keeps its
    partial folder with every raster finished, as a run killed there does."""

    def __init__(self, monkeypatch, folder: Path):
        self.folder, self.real, self.failed = folder, os.replace, False
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, src, dst, **kwargs):
        target = Path(os.path.abspath(dst))
        if not self.failed and target.parent == self.folder and target.name == "h.report.json":
            self.failed = True
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
        return self.real(src, dst, **kwargs)


def polygons_by_raster(layer: Path) -> dict[str, int]:
    meta, _, _, values = pyogrio.raw.read(layer)
    rasters = list(values[list(meta["fields"]).index("raster")])
    return {name: rasters.count(name) for name in sorted(set(rasters))}


@pytest.fixture(scope="module")
def kept(local_ray, tiny_model, tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    """The rasters' folder; an output folder whose run stopped at its commit (both rasters finished, kept in
    h.gpkg.partial/); the polygons per raster that the same command, resumed on it undamaged, writes."""
    root = tmp_path_factory.mktemp("kept")
    inputs, folder = root / "in", root / "run"
    write_image(inputs / "a.tif", 500000, 1)
    write_image(inputs / "b.tif", 500200, 2)
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        failing = FailingReportRename(patch, folder)
        stopped = run_segment([inputs], folder, tiny_model)
    assert failing.failed and stopped.exit_code == 2, stopped.output
    assert sorted(p.name for p in (partial_folder(folder / "h.gpkg") / "rasters").iterdir()) == ["r000000",
                                                                                                 "r000001"]
    resumed = root / "resumed"
    shutil.copytree(folder, resumed)
    result = run_segment([inputs], resumed, tiny_model)
    assert result.exit_code == 0, result.output
    report = json.loads((resumed / "h.report.json").read_text())
    assert report["chunks"]["computed"] == 0  # both rasters resumed
    polygons = polygons_by_raster(resumed / "h.gpkg")
    assert sorted(polygons) == ["a.tif", "b.tif"]
    return inputs, folder, polygons


def _resume(kept, tiny_model, tmp_path, damage) -> dict:
    inputs, stopped, polygons = kept
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    partial = partial_folder(folder / "h.gpkg")
    damage(partial)
    result = run_segment([inputs], folder, tiny_model)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and not partial.exists()
    assert polygons_by_raster(folder / "h.gpkg") == polygons  # the same polygons as an undamaged resume
    return json.loads((folder / "h.report.json").read_text())


def test_an_empty_polygon_layer_of_a_finished_raster_is_computed_again(kept, tiny_model, tmp_path):
    """It ended in GDAL's 'not recognized as being in a supported file format' traceback on every resume."""

    def damage(partial):
        (partial / "rasters" / "r000000" / "polygons.gpkg").write_bytes(b"")

    report = _resume(kept, tiny_model, tmp_path, damage)
    assert report["chunks"]["computed"] > 0
    assert any("r000000" in warning and "computed again" in warning for warning in report["warnings"])


def test_manifest_lines_that_are_not_the_runs_are_skipped(kept, tiny_model, tmp_path):
    """A line `5` ended in a TypeError traceback; {"raster": "x"} in a ValueError, bytes that are not UTF-8 in
    UnicodeDecodeError."""

    def damage(partial):
        with open(partial / "manifest.jsonl", "ab") as manifest:
            manifest.write(b'5\n{"raster": "x"}\n\xff\xfe\x00garbage\n[1, 2]\n{"chunk": 3, "file": null}\n')

    report = _resume(kept, tiny_model, tmp_path, damage)
    assert report["chunks"]["computed"] == 0  # the finished rasters' lines are still read


def test_an_empty_block_file_of_an_unfinished_raster_is_computed_again(kept, tiny_model, tmp_path):
    """An empty blocks/*.npz (np.load's EOFError) ended every resume in 'Aborted.', exit 1."""

    def damage(partial):
        manifest = partial / "manifest.jsonl"
        entries = [json.loads(line) for line in manifest.read_text().splitlines()]
        # As a run killed before its second raster was finished leaves it, that raster's first block emptied.
        kept_entries = [e for e in entries if not ("chunk" not in e and e.get("raster") == 1)]
        manifest.write_text("".join(json.dumps(e) + "\n" for e in kept_entries))
        first = next(e for e in kept_entries if "chunk" in e and e["raster"] == 1)
        (partial / "blocks" / first["file"]).write_bytes(b"")

    report = _resume(kept, tiny_model, tmp_path, damage)
    assert report["chunks"]["computed"] > 0


def test_a_block_damaged_past_its_table_of_contents_is_one_sentence_and_computed_again_next_time(tmp_path):
    out = tmp_path / "result.gpkg"
    facts = {"inputs": [{"path": "/data/a.tif", "bytes": 10}], "classes": ["water"]}
    manifest = Manifest.open(out, facts, restart=False)
    manifest.add_chunk("r000000-0-0", {"class_ids": np.arange(4096, dtype=np.int32)}, {"raster": 0})
    manifest.close()
    block = partial_folder(out) / "blocks" / "r000000-0-0.npz"
    data = bytearray(block.read_bytes())
    data[1000:1100] = b"\x55" * 100  # inside the array's data: its zip directory is whole, its CRC is not
    block.write_bytes(bytes(data))

    again = Manifest.open(out, facts, restart=False)
    assert list(again.chunks) == ["r000000-0-0"]  # its table of contents reads
    with pytest.raises(InputError) as refused:
        again.load_chunk("r000000-0-0")
    again.close()
    message = str(refused.value)
    assert message.startswith(f"{block}, a finished chunk kept by the unfinished run in {partial_folder(out)}, "
                              "cannot be read (")
    assert message.endswith("run the same command again to compute that part again (or add --restart to start "
                            "the whole run over).")
    assert Manifest.open(out, facts, restart=False).chunks == {}  # the next run computes it again


def test_a_block_damaged_in_its_data_stops_the_run_in_one_sentence_and_the_next_run_completes(kept, tiny_model,
                                                                                              tmp_path):
    """What the block's table of contents cannot show (a CRC error on reading) was a BadZipFile traceback."""
    inputs, stopped, polygons = kept
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    partial = partial_folder(folder / "h.gpkg")
    manifest = partial / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    kept_entries = [e for e in entries if not ("chunk" not in e and e.get("raster") == 1)]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in kept_entries))
    first = next(e for e in kept_entries if "chunk" in e and e["raster"] == 1)
    block = partial / "blocks" / first["file"]
    arrays = {"class_ids": np.zeros((48, 48), np.uint8), "score": np.zeros((48, 48), np.float32),
              "signals": np.zeros((2, 48, 48), np.float32), "valid": np.array(48 * 48),
              "block_rows": np.array([48], np.int64)}
    np.savez(block, **arrays)
    data = bytearray(block.read_bytes())
    data[200:260] = b"\x55" * 60  # inside class_ids' data
    block.write_bytes(bytes(data))

    result = run_segment([inputs], folder, tiny_model)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(f"Error: {block}, a finished chunk kept by the unfinished run in")
    assert "Traceback" not in result.output and partial.is_dir() and not block.exists()
    assert not (folder / "h.gpkg").exists()
    again = run_segment([inputs], folder, tiny_model)
    assert again.exit_code == 0, again.output
    assert polygons_by_raster(folder / "h.gpkg") == polygons


@pytest.mark.parametrize("name, folder", [("blocks", False), ("manifest.jsonl", True)])
def test_a_file_and_folder_swapped_in_the_partial_folder_is_one_sentence_and_restart_clears_it(tmp_path, name,
                                                                                              folder):
    """A file at blocks/ (FileExistsError) or a folder at manifest.jsonl (IsADirectoryError) was a traceback."""
    out = tmp_path / "result.gpkg"
    facts = {"inputs": [{"path": "/data/a.tif", "bytes": 10}], "classes": ["water"]}
    Manifest.open(out, facts, restart=False).close()
    swapped = partial_folder(out) / name
    if swapped.is_dir():
        shutil.rmtree(swapped)
    swapped.mkdir() if folder else swapped.write_text("x")
    with pytest.raises(InputError) as refused:
        Manifest.open(out, facts, restart=False)
    assert str(refused.value).startswith(f"The partial folder {partial_folder(out)} of an unfinished run cannot be "
                                         f"used ({swapped}): ")
    assert str(refused.value).endswith("add --restart to start the run over, or delete that folder.")
    fresh = Manifest.open(out, facts, restart=True)
    assert fresh.chunks == {} and fresh.blocks.is_dir()
    fresh.close()
