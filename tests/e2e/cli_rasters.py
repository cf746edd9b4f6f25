"""Helpers of the tests that run the CLI in-process on synthetic rasters and read back the geometry written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import rasterio
import shapely
from rasterio.transform import from_origin
from typer.testing import CliRunner

from backend.service.cli import app

MODEL_ARGS = ["--device", "cpu", "-q"]
# A box from 170 to 190 (or -190 to -170) degrees east on a world raster: its two parts.
STRIPS = shapely.union_all([shapely.box(170, -10, 180, 10), shapely.box(-180, -10, -170, 10)])


def run(*args):
    """`farslip ARGS...` in this process; never a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def raster(path: Path, crs, transform, width: int, height: int) -> Path:
    """A random RGB GeoTIFF on the given grid."""
    pixels = np.random.default_rng(0).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(pixels)
    return path


def geometries(path: Path) -> np.ndarray:
    """The shapely geometries of a vector file's first layer."""
    return shapely.from_wkb(pyogrio.raw.read(path)[2])


def world(tmp_path: Path) -> Path:
    """A world raster in degrees, -180..180 x -90..90 at 0.5 degree pixels."""
    return raster(tmp_path / "world.tif", "EPSG:4326", from_origin(-180.0, 90.0, 0.5, 0.5), 720, 360)
