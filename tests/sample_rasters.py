"""Small GeoTIFFs cut from the sample data (../shared/data) for tests that want a real raster but short runs."""

from __future__ import annotations

from pathlib import Path

import rasterio
import rasterio.windows

NAIP = "naip_2020_5m.tif"  # EPSG:26914, 5 m, RGBN uint8


def naip_corner(shared_data: Path, path: Path, size: int) -> Path:
    """A size x size corner of the NAIP sample (from pixel 100, 100), untiled, with its CRS, bands and nodata."""
    with rasterio.open(shared_data / NAIP) as src:
        window = rasterio.windows.Window(100, 100, size, size)
        profile = {**src.profile, "width": size, "height": size, "transform": src.window_transform(window),
                   "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path
