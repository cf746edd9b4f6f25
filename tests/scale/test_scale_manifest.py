"""The partial folder of a Ray run: what a killed run left is found again, other settings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from backend.engine.errors import InputError
from backend.scale.manifest import Manifest, partial_folder

FACTS = {"inputs": [{"path": "/data/a.tif", "bytes": 10}], "classes": ["water"], "--threshold": 0.0}


def block(value: int) -> dict[str, np.ndarray]:
    return {"class_ids": np.full((3, 4), value, np.uint8), "score": np.full((3, 4), 0.5, np.float32)}


def test_finished_chunks_survive_a_killed_driver_and_a_cut_last_line(tmp_path):
    out = tmp_path / "result.gpkg"
    first = Manifest.open(out, FACTS, restart=False)
    first.add_chunk("r000000-0-0", block(1), {"raster": 0})
    first.add_chunk("r000000-0-4", block(2), {"raster": 0})
    first.close()  # as a kill -9 would leave it, with half a line appended
    with open(partial_folder(out) / "manifest.jsonl", "a") as manifest:
        manifest.write('{"chunk": "r000000-3-0", "fi')
    again = Manifest.open(out, FACTS, restart=False)
    assert sorted(again.chunks) == ["r000000-0-0", "r000000-0-4"]
    assert np.array_equal(again.load_chunk("r000000-0-4")["class_ids"], block(2)["class_ids"])
    again.add_raster(0, {"path": "/data/a.tif"}, ["r000000-0-0", "r000000-0-4"])
    assert list((partial_folder(out) / "blocks").iterdir()) == []  # a finished raster's blocks go
    again.close()
    assert Manifest.open(out, FACTS, restart=False).finished[0]["path"] == "/data/a.tif"


def test_other_settings_are_refused_by_name_and_restart_starts_over(tmp_path):
    out = tmp_path / "result.gpkg"
    manifest = Manifest.open(out, FACTS, restart=False)
    manifest.add_chunk("r000000-0-0", block(1), {"raster": 0})
    manifest.close()
    other = dict(FACTS, classes=["road"], **{"--threshold": 0.2})
    with pytest.raises(InputError) as refused:
        Manifest.open(out, other, restart=False)
    message = str(refused.value)
    assert message.startswith(f"{partial_folder(out)} holds an unfinished run with other --threshold, classes; ")
    assert message.endswith("delete that folder (or add --restart) to start this one over.")
    fresh = Manifest.open(out, other, restart=True)
    assert fresh.chunks == {} and fresh.finished == {}
    fresh.close()


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "result.gpkg"
    running = Manifest.open(out, FACTS, restart=False)
    with pytest.raises(InputError, match="Another farslip run is writing"):
        Manifest.open(out, FACTS, restart=False)
    running.remove()
    assert not partial_folder(out).exists()


def test_an_input_copied_over_with_its_size_and_mtime_is_another_input(tmp_path):
    """A resumed run checks its inputs are the ones it started on: a raster replaced by a copy that kept the
    old size and mtime (cp -p, rsync -a) passed the check, and the new run mixed chunks of both."""
    import os
    import shutil

    from backend.scale.run import _input_facts

    raster, other = tmp_path / "a.tif", tmp_path / "b.tif"
    raster.write_bytes(b"A" * 1000)
    other.write_bytes(b"B" * 1000)
    stat = raster.stat()
    before = _input_facts([str(raster)])
    shutil.copyfile(other, tmp_path / "b.copy")
    os.replace(tmp_path / "b.copy", raster)
    os.utime(raster, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = _input_facts([str(raster)])
    assert raster.stat().st_size == stat.st_size and raster.stat().st_mtime_ns == stat.st_mtime_ns
    assert after != before
    assert _input_facts([str(raster)]) == after  # an untouched input keeps its facts


def test_a_changed_tile_of_an_unchanged_vrt_mosaic_is_another_input(tmp_path):
    """A resumed run over a VRT mosaic whose source tile was rewritten (the .vrt untouched) reused the old
    chunks without a word: every file the mosaic reads counts, and the refusal says the inputs changed."""
    import rasterio
    from rasterio.transform import Affine

    from backend.scale.run import _input_facts

    tile = tmp_path / "tile.tif"
    with rasterio.open(tile, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(1, 0, 500000, 0, -1, 5000000)) as ds:
        ds.write(np.zeros((1, 8, 8), np.uint8))
    mosaic = tmp_path / "mosaic.vrt"
    mosaic.write_text('<VRTDataset rasterXSize="8" rasterYSize="8"><GeoTransform>500000, 1, 0, 5000000, 0, -1'
                      '</GeoTransform><VRTRasterBand dataType="Byte" band="1"><SimpleSource><SourceFilename '
                      'relativeToVRT="1">tile.tif</SourceFilename><SourceBand>1</SourceBand></SimpleSource>'
                      '</VRTRasterBand></VRTDataset>')
    before = _input_facts([str(mosaic)])
    out = tmp_path / "out.gpkg"
    Manifest.open(out, {**FACTS, "inputs": before}, restart=False).close()
    with rasterio.open(tile, "r+") as ds:
        ds.write(np.full((1, 8, 8), 255, np.uint8))
    after = _input_facts([str(mosaic)])
    assert after != before and after[0]["path"] == before[0]["path"]
    with pytest.raises(InputError, match=r"other inputs \(rasters, or files they read"):
        Manifest.open(out, {**FACTS, "inputs": after}, restart=False)
