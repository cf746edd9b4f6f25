"""Region ids -> polygons: GDAL's polygoniser called outside the GIL gives rasterio's polygons exactly."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from scipy import ndimage

from backend.engine import polygonize


def labelled_regions(seed: int, shape=(120, 90)) -> np.ndarray:
    """Regions with holes, holes in holes, islands, one-pixel regions and corner contacts."""
    rng = np.random.default_rng(seed)
    labels = ndimage.label(rng.random(shape) > 0.55)[0].astype(np.int32)
    labels[40:80, 30:70] = labels.max() + 1
    labels[50:70, 40:60] = labels.max() + 1
    labels[58:62, 48:52] = labels.max() + 1
    labels[0, 0], labels[1, 1] = labels.max() + 1, labels.max() + 2
    return labels


def assert_same(got, expected) -> None:
    np.testing.assert_array_equal(got[0], expected[0])
    assert len(got[1]) == len(expected[1])
    assert all(shapely.equals_exact(a, b, tolerance=0) for a, b in zip(got[1], expected[1]))


@pytest.mark.parametrize("transform", [Affine.translation(5, 7), Affine(0.5, 0, 10, 0, -0.5, 20)])
def test_gdal_outside_the_gil_gives_rasterios_polygons_vertex_for_vertex(transform):
    for seed in (2, 3):
        labels = labelled_regions(seed)
        got = polygonize.region_polygons(labels, transform)
        expected = polygonize._with_rasterio(labels, transform)
        assert any(len(polygon.interiors) for polygon in got[1])  # holes came through
        np.testing.assert_array_equal(np.unique(got[0]), np.unique(labels[labels > 0]))  # no value lost
        assert shapely.area(got[1]).sum() == pytest.approx((labels > 0).sum() * abs(transform.determinant))
        assert_same(got, expected)


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")),
                    reason="loaded libraries are listed on Linux and macOS only")
def test_rasterios_own_gdal_library_is_found_and_used():
    """Otherwise every run would quietly take the slower path that holds the GIL."""
    gdal = polygonize.rasterio_gdal()
    assert gdal is not None
    assert gdal.version == rasterio.__gdal_version__
    labels, transform = labelled_regions(5), Affine.translation(1, 2)
    assert_same(gdal.polygons(labels, transform), polygonize._with_rasterio(labels, transform))


def test_without_that_library_or_when_a_call_fails_rasterio_gives_the_same_polygons(monkeypatch):
    labels = labelled_regions(4)
    transform = Affine.translation(3, 1)
    expected = polygonize.region_polygons(labels, transform)

    monkeypatch.setattr(polygonize, "_found", [None])
    assert_same(polygonize.region_polygons(labels, transform), expected)

    class Failing:
        def polygons(self, ids, transform):
            raise RuntimeError("GDALPolygonize failed")

    monkeypatch.setattr(polygonize, "_found", [Failing()])
    assert_same(polygonize.region_polygons(labels, transform), expected)


def test_no_regions_gives_no_polygons_and_a_single_pixel_gives_one():
    empty = np.zeros((4, 6), np.int32)
    values, polygons = polygonize.region_polygons(empty, Affine.identity())
    assert len(values) == len(polygons) == 0
    empty[2, 3] = 7
    values, polygons = polygonize.region_polygons(empty, Affine.translation(10, 20))
    assert list(values) == [7]
    assert shapely.equals(polygons[0], shapely.box(13, 22, 14, 23))


@pytest.mark.parametrize("path, is_gdal", [
    ("/v/site-packages/rasterio.libs/libgdal-c8c9c467.so.36.3.10.3", True),
    ("/usr/lib/x86_64-linux-gnu/libgdal.so.32", True),
    ("/usr/lib/libgdal.so", True),
    ("/v/site-packages/rasterio/.dylibs/libgdal.36.dylib", True),
    ("/usr/lib/x86_64-linux-gnu/libgdal-extra.txt", False),
    ("/usr/lib/libogdi.so.4.1", False),
    ("/v/site-packages/rasterio/_features.cpython-311-x86_64-linux-gnu.so", False),
])
def test_gdal_libraries_are_recognised_by_their_file_names(path, is_gdal):
    assert bool(polygonize._LIBRARY_NAME.search(path)) is is_gdal
