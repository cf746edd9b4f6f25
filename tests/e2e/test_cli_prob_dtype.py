"""`segment --prob-raster P.tif --prob-dtype uint8`: the probability raster a quarter of the float32 size (DESIGN's
"uint8 scaled"), read as probabilities 0..1 by GDAL through the scale the file carries.

A float32 probability raster of a 100 Mpx raster and ten classes is 4 GB before compression, and
probabilities barely compress; the only form there was.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from backend.service.cli import app

SYSTEM_PYTHON = Path("/usr/bin/python3")  # the system's GDAL, the one QGIS reads with
CLASSES = ["-c", "water", "-c", "forest, trees", "-c", "bare field"]
runner = CliRunner()


def segment(*args) -> str:
    result = runner.invoke(app, ["segment", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def both(shared_data, tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """RGB.byte.tif (nodata 0 around the scene) segmented with float32, uint8 and float16 probabilities."""
    folder = tmp_path_factory.mktemp("probs")
    raster = shared_data / "RGB.byte.tif"
    for kind in ("float32", "uint8", "float16"):
        segment(raster, *CLASSES, "--model", tiny_model, "--out", folder / f"{kind}.gpkg",
                "--prob-raster", folder / f"{kind}.tif", "--prob-dtype", kind, "--quiet")
    return folder / "float32.tif", folder / "uint8.tif", folder / "float16.tif"


def test_uint8_probabilities_are_the_float_ones_rounded_to_254_steps_with_nodata_255(both):
    with rasterio.open(both[0]) as exact, rasterio.open(both[1]) as small:
        assert exact.dtypes == ("float32",) * 3 and small.dtypes == ("uint8",) * 3
        assert small.nodata == 255 and small.scales == (1 / 254,) * 3 and small.offsets == (0.0,) * 3
        assert small.descriptions == exact.descriptions == ("water", "forest", "bare field")
        assert (small.crs, small.transform, small.shape) == (exact.crs, exact.transform, exact.shape)
        probs, stored = exact.read(), small.read()
    nodata = np.isnan(probs)
    assert nodata.any() and (~nodata).any()
    assert np.array_equal(stored == 255, nodata), "255 exactly where the float raster is NaN"
    assert np.array_equal(stored[~nodata], np.rint(probs[~nodata] * 254).astype(np.uint8))
    assert np.abs(stored[~nodata] / 254 - probs[~nodata]).max() <= 0.5 / 254 + 1e-7
    assert both[1].stat().st_size * 3 < both[0].stat().st_size


def test_the_system_gdal_reads_the_uint8_raster_as_probabilities(both):
    """gdal.Info as QGIS's GDAL gives it: each band's scale and offset, so values read as 0..1."""
    done = subprocess.run([str(SYSTEM_PYTHON), "-c", "import json, sys; from osgeo import gdal; print(json.dumps("
                           "[[b['description'], b.get('scale'), b.get('offset'), b.get('noDataValue')] for b in "
                           "gdal.Info(sys.argv[1], format='json')['bands']]))", str(both[1])],
                          capture_output=True, text=True, timeout=60, check=True)
    bands = json.loads(done.stdout)
    assert [name for name, *_ in bands] == ["water", "forest", "bare field"]
    assert all(abs(scale - 1 / 254) < 1e-12 and offset == 0 and nodata == 255 for _, scale, offset, nodata in bands)


def test_float16_probabilities_are_the_float_ones_as_half_floats_with_nan_nodata(both):
    """DESIGN's "float16": 16-bit floats on disk (NBITS=16 of a Float32 band: GDAL before 3.11 has no Float16 type),
    read back as float32 holding the half-float values, NaN where nodata, names kept, about half the size."""
    with rasterio.open(both[0]) as exact, rasterio.open(both[2]) as half:
        assert half.dtypes == ("float32",) * 3 and np.isnan(half.nodata)
        assert half.tags(1, "IMAGE_STRUCTURE").get("NBITS") == "16"
        assert half.descriptions == exact.descriptions and half.scales == (1.0,) * 3
        assert (half.crs, half.transform, half.shape) == (exact.crs, exact.transform, exact.shape)
        probs, stored = exact.read(), half.read()
    nodata = np.isnan(probs)
    assert np.array_equal(np.isnan(stored), nodata)
    assert np.array_equal(stored[~nodata], probs[~nodata].astype(np.float16).astype(np.float32))
    assert both[2].stat().st_size < both[0].stat().st_size * 0.75


def test_the_system_gdal_reads_the_float16_raster_as_16_bit_floats(both):
    """QGIS's GDAL (3.6 here) reads the half floats as Float32 values with NaN nodata."""
    script = ("import json, sys; from osgeo import gdal; ds = gdal.Open(sys.argv[1]); b = ds.GetRasterBand(1); "
              "a = b.ReadAsArray(); print(json.dumps([gdal.GetDataTypeName(b.DataType), "
              "b.GetMetadataItem('NBITS', 'IMAGE_STRUCTURE'), str(b.GetNoDataValue()), "
              "float(a[a == a].max()), int((a != a).sum())]))")
    done = subprocess.run([str(SYSTEM_PYTHON), "-c", script, str(both[2])],
                          capture_output=True, text=True, timeout=60, check=True)
    kind, nbits, nodata, highest, nans = json.loads(done.stdout)
    with rasterio.open(both[2]) as half:
        band = half.read(1)
    assert (kind, nbits, nodata) == ("Float32", "16", "nan")
    assert highest == float(np.nanmax(band)) and nans == int(np.isnan(band).sum()) > 0


@pytest.mark.parametrize(("args", "words"), [
    (["--prob-dtype", "uint8"], "--prob-dtype uint8 says how the probability raster stores its values, and no "
                                "--prob-raster was given"),
    (["--prob-raster", "p.tif", "--prob-dtype", "float64"], "float64"),
])
def test_a_prob_dtype_without_a_probability_raster_or_unknown_is_one_sentence(shared_data, tiny_model, tmp_path,
                                                                              monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["segment", str(shared_data / "RGB.byte.tif"), *CLASSES, "--model", str(tiny_model),
                                 "--out", "r.gpkg", *args])
    assert result.exit_code == 2 and words in result.output, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
