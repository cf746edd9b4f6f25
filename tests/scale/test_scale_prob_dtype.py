"""`segment TILES --workers N --prob-raster p.vrt --prob-dtype uint8`: each tile's GeoTIFF is the one `segment`
writes for it with --prob-dtype uint8, and the VRT mosaic keeps their scale, so GDAL reads probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window, from_bounds
from typer.testing import CliRunner

from backend.service.cli import app

pytest.importorskip("ray")  # the ray extra: installed by `make setup`

CLASSES = ["-c", "water", "-c", "cropland, bare field"]
runner = CliRunner()


def write_tile(source: Path, target: Path, window: Window) -> None:
    with rasterio.open(source) as src:
        profile = dict(src.profile, width=int(window.width), height=int(window.height),
                       transform=src.window_transform(window))
        with rasterio.open(target, "w", **profile) as dst:
            dst.write(src.read(window=window))


def test_uint8_probability_tiles_and_their_vrt_are_what_segment_writes_per_tile(shared_data, tiny_model, local_ray,
                                                                               tmp_path):
    tiles = [tmp_path / "west.tif", tmp_path / "east.tif"]
    source = shared_data / "naip_2020_5m.tif"
    write_tile(source, tiles[0], Window(0, 0, 300, 300))
    write_tile(source, tiles[1], Window(300, 0, 300, 300))
    result = runner.invoke(app, ["segment", *map(str, tiles), *CLASSES, "--model", str(tiny_model), "--out",
                                 str(tmp_path / "all.gpkg"), "--prob-raster", str(tmp_path / "p.vrt"),
                                 "--prob-dtype", "uint8", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "p.vrt") as mosaic:
        assert mosaic.dtypes == ("uint8",) * 2 and mosaic.nodata == 255
        assert mosaic.scales == (1 / 254,) * 2 and mosaic.descriptions == ("water", "cropland")
        for tile in tiles:
            alone = tmp_path / f"{tile.stem}_alone.tif"
            done = runner.invoke(app, ["segment", str(tile), *CLASSES, "--model", str(tiny_model), "--out",
                                       str(tmp_path / f"{tile.stem}.gpkg"), "--prob-raster", str(alone),
                                       "--prob-dtype", "uint8", "--quiet"])
            assert done.exit_code == 0, done.output
            with rasterio.open(alone) as own, rasterio.open(tmp_path / "p_rasters" / tile.name) as copy:
                assert (copy.dtypes, copy.scales, copy.nodata) == (own.dtypes, own.scales, own.nodata)
                values = own.read()
                assert np.array_equal(copy.read(), values) and (values < 255).any()
                window = from_bounds(*own.bounds, transform=mosaic.transform).round_offsets().round_lengths()
                assert np.array_equal(mosaic.read(window=window), values)
