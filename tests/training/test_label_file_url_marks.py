"""Label files whose names hold ; ? or # (pyogrio reads a path as a URL and opened another file, or none)."""

from __future__ import annotations

import shutil

import numpy as np
import pyogrio.raw
import pytest
from training_data import COLOURS

from backend.engine.raster import open_source
from training.labels import build_label_grid, read_label_polygons


def grid_from(raster, labels):
    with open_source(raster) as source:
        return build_label_grid(source, read_label_polygons(labels, "cls", source.crs, None))


@pytest.mark.parametrize("name", ["labels;v2.gpkg", "plot#3.gpkg", "what?.gpkg", "parcels;old.shp"])
def test_a_label_file_named_with_a_url_mark_is_read_as_itself(synthetic, tmp_path, name):
    raster, labels, _ = synthetic
    expected = grid_from(raster, labels)
    target = tmp_path / "a;folder" / name
    target.parent.mkdir()
    if name.endswith(".shp"):
        meta, _, geometry, fields = pyogrio.raw.read(labels)
        pyogrio.raw.write(target.with_name("plain.shp"), geometry, fields, meta["fields"], driver="ESRI Shapefile",
                          geometry_type=meta["geometry_type"], crs=meta["crs"])
        for part in target.parent.glob("plain.*"):  # the shapefile's parts, renamed as a user's would be
            part.rename(target.with_suffix(part.suffix))
    else:
        shutil.copy(labels, target)
    # The file pyogrio took for it before: a decoy of the name before the mark, with no class field.
    (tmp_path / "a").write_text("not the labels")
    grid = grid_from(raster, target)
    assert grid.class_lines == sorted(COLOURS)
    assert np.array_equal(grid.labels, expected.labels)
