"""Class raster -> polygons: one feature per connected region, exact pixel edges, exact stats."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage

from backend.engine.polygonize import polygons_of
from backend.engine.vectorize import finalize, polygon_areas_m2, vectorize_class_raster

UTM = CRS.from_epsg(32633)
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0)
FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def write_raster(path: Path, array: np.ndarray, crs=UTM, transform=TRANSFORM, nodata=None) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=array.shape[1],
        height=array.shape[0],
        count=1,
        dtype=array.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dataset:
        dataset.write(array, 1)
    return path


def seam_crossing_classes() -> np.ndarray:
    """A 40x30 raster: a snake of class 1 crossing every 7-row seam, with holes, diagonal touches,
    class 2 blobs, a nodata collar (255) and scattered class 0."""
    classes = np.zeros((40, 30), dtype=np.uint8)
    classes[2:38, 3:6] = 1  # a long vertical bar through every seam
    classes[35:38, 3:25] = 1  # joined at the bottom to another bar
    classes[5:38, 22:25] = 1
    classes[10:20, 10:20] = 2  # a square with a hole of class 0 and an island of class 1 inside
    classes[13:17, 13:17] = 0
    classes[14:16, 14:16] = 1
    classes[6, 12] = 2  # touches the square only diagonally (must stay separate)
    classes[7, 11] = 2
    classes[20, 20] = 2  # diagonal to the square's corner: separate region
    classes[:, 28:] = 255
    classes[0, :] = 255
    classes[25:27, 8:20] = 3  # a thin strip that sits across a seam (rows 25|26 ... 28 is a seam)
    return classes


def rasterize(regions, shape, fill=255) -> np.ndarray:
    return rasterio.features.rasterize(
        [(r.geometry, r.class_id) for r in regions],
        out_shape=shape,
        transform=TRANSFORM,
        fill=fill,
        dtype=np.uint8,
    )


@pytest.fixture
def rasters(tmp_path):
    classes = seam_crossing_classes()
    scores = np.random.default_rng(0).random(classes.shape).astype(np.float32)
    return (
        classes,
        scores,
        write_raster(tmp_path / "classes.tif", classes, nodata=255),
        write_raster(tmp_path / "scores.tif", scores),
    )


def expected_region_count(classes: np.ndarray, skip=(255,)) -> int:
    return sum(ndimage.label(classes == v, structure=FOUR)[1] for v in np.unique(classes) if v not in skip)


@pytest.mark.parametrize("strip_rows", [1, 3, 7, 1024])
def test_each_connected_region_is_exactly_one_polygon_across_strip_seams(rasters, strip_rows):
    classes, _, class_path, score_path = rasters
    regions = vectorize_class_raster(class_path, score_path, strip_rows=strip_rows)
    assert len(regions) == expected_region_count(classes)
    assert all(r.geometry.geom_type == "Polygon" and r.geometry.is_valid for r in regions)
    # Every class-1 pixel of the snake is one region, whatever the strip height.
    snake = [r for r in regions if r.class_id == 1 and r.pixel_count > 10]
    assert len(snake) == 1
    labels, _ = ndimage.label(classes == 1, structure=FOUR)
    assert snake[0].pixel_count == int((labels == labels[2, 3]).sum())


@pytest.mark.parametrize("strip_rows", [1, 3, 7])
def test_regions_joined_across_seams_are_the_polygons_of_the_unsplit_raster_vertex_for_vertex(rasters, strip_rows):
    """Seams leave no vertex behind: a region joined from strips has exactly the vertices GDAL gives it
    when the raster is polygonised in one piece (no collinear points where the strips met)."""
    _, _, class_path, score_path = rasters
    whole = {(r.class_id, r.pixel_count, r.geometry.bounds): r.geometry
             for r in vectorize_class_raster(class_path, score_path, strip_rows=1024)}
    joined = vectorize_class_raster(class_path, score_path, strip_rows=strip_rows)
    assert len(joined) == len(whole)
    for region in joined:
        expected = whole[(region.class_id, region.pixel_count, region.geometry.bounds)]
        assert shapely.get_num_coordinates(region.geometry) == shapely.get_num_coordinates(expected)
        assert shapely.equals_exact(shapely.normalize(region.geometry), shapely.normalize(expected), tolerance=0)


@pytest.mark.parametrize("strip_rows", [7, 1024])
def test_rasterising_the_polygons_reproduces_the_class_raster(rasters, strip_rows):
    classes, _, class_path, score_path = rasters
    regions = vectorize_class_raster(class_path, score_path, strip_rows=strip_rows)
    np.testing.assert_array_equal(rasterize(regions, classes.shape), classes)
    for region in regions:
        assert math.isclose(region.geometry.area, region.pixel_count * 4.0)


def test_a_class_raster_wider_than_uint8_gives_the_same_regions_with_its_own_values(rasters, tmp_path):
    classes, _, class_path, _ = rasters
    wide = classes.astype(np.uint16) * 200  # 0, 200, 400, 600 and the collar 51000, declared nodata
    wide_path = write_raster(tmp_path / "wide.tif", wide, nodata=255 * 200)
    narrow = vectorize_class_raster(class_path, strip_rows=7)
    regions = vectorize_class_raster(wide_path, strip_rows=7)
    assert sorted({r.class_id for r in regions}) == [0, 200, 400, 600]

    def key(r):
        return r.pixel_count, shapely.normalize(r.geometry).wkb

    assert sorted((r.class_id, *key(r)) for r in regions) == sorted((r.class_id * 200, *key(r)) for r in narrow)


def test_region_scores_match_numpy_on_the_same_pixels(rasters):
    classes, scores, class_path, score_path = rasters
    regions = vectorize_class_raster(class_path, score_path, strip_rows=7)
    for region in regions:
        pixels = rasterio.features.geometry_mask(
            [region.geometry], out_shape=classes.shape, transform=TRANSFORM, invert=True
        )
        assert region.pixel_count == int(pixels.sum())
        assert np.all(classes[pixels] == region.class_id)
        assert region.score_mean == pytest.approx(float(scores[pixels].astype(np.float64).mean()), rel=1e-9)
        assert region.score_max == float(scores[pixels].max())


def test_without_a_score_raster_scores_are_nan(rasters):
    _, _, class_path, _ = rasters
    regions = vectorize_class_raster(class_path, None, strip_rows=7)
    assert regions and all(math.isnan(r.score_mean) and math.isnan(r.score_max) for r in regions)


def test_skip_values_and_nodata_give_no_polygons(tmp_path):
    classes = seam_crossing_classes()
    path = write_raster(tmp_path / "no_nodata_tag.tif", classes)
    regions = vectorize_class_raster(path, None, skip_values=(255, 0), strip_rows=7)
    assert {r.class_id for r in regions} == {1, 2, 3}
    burned = rasterize(regions, classes.shape)
    np.testing.assert_array_equal(burned == 255, np.isin(classes, (0, 255)))
    # The raster's own nodata value is skipped even when not listed.
    tagged = write_raster(tmp_path / "tagged.tif", classes, nodata=0)
    assert 0 not in {r.class_id for r in vectorize_class_raster(tagged, None, skip_values=(255,))}


def test_all_skipped_raster_gives_no_polygons(tmp_path):
    path = write_raster(tmp_path / "empty.tif", np.full((20, 20), 255, np.uint8), nodata=255)
    assert vectorize_class_raster(path, None, strip_rows=7) == []


def test_mismatched_score_raster_is_rejected(rasters, tmp_path):
    from backend.engine.errors import InputError

    _, _, class_path, _ = rasters
    small = write_raster(tmp_path / "small.tif", np.zeros((5, 5), np.float32))
    with pytest.raises(InputError, match="must match"):
        vectorize_class_raster(class_path, small)


@pytest.mark.parametrize("strip_threads", [0, 2])
def test_cancel_raises_and_stops(rasters, monkeypatch, strip_threads):
    from backend.engine import vectorize
    from backend.engine.errors import CancelledError

    monkeypatch.setattr(vectorize, "STRIP_THREADS", strip_threads)
    _, _, class_path, score_path = rasters
    with pytest.raises(CancelledError):
        vectorize_class_raster(class_path, score_path, strip_rows=4, should_cancel=lambda: True)


def test_projected_area_uses_the_crs_unit(rasters):
    _, _, class_path, score_path = rasters
    regions = finalize(vectorize_class_raster(class_path, score_path), UTM, TRANSFORM)
    assert all(r.area_m2 == pytest.approx(r.pixel_count * 4.0) for r in regions)
    square = shapely.box(0, 0, 100, 100)
    us_feet = CRS.from_epsg(2263)  # NAD83 / New York Long Island (ftUS)
    assert polygon_areas_m2([square], us_feet)[0] == pytest.approx(10000 * (1200 / 3937) ** 2)


def test_geographic_area_is_geodesic_square_metres():
    # 0.01 x 0.01 degree at the equator: about 1113.2 m x 1105.7 m on WGS84.
    cell = shapely.box(10.0, 0.0, 10.01, 0.01)
    area = polygon_areas_m2([cell], CRS.from_epsg(4326))[0]
    assert area == pytest.approx(1113.19 * 1105.74, rel=1e-3)
    # Further north the same cell is smaller, as it should be.
    assert polygon_areas_m2([shapely.box(10.0, 60.0, 10.01, 60.01)], "EPSG:4326")[0] < area / 1.9


def test_geographic_raster_regions_get_square_metre_areas(tmp_path):
    classes = np.zeros((10, 10), np.uint8)
    classes[:5] = 1
    transform = Affine(0.001, 0, 10.0, 0, -0.001, 45.0)
    path = write_raster(tmp_path / "geo.tif", classes, crs=CRS.from_epsg(4326), transform=transform)
    regions = finalize(vectorize_class_raster(path, None), CRS.from_epsg(4326), transform)
    total = sum(r.area_m2 for r in regions)
    # 0.01 deg x 0.01 deg at 45 N is about 788 m x 1111 m.
    assert total == pytest.approx(787.6 * 1111.4, rel=5e-3)


def test_min_area_drops_small_regions(rasters):
    _classes, _, class_path, score_path = rasters
    regions = vectorize_class_raster(class_path, score_path, strip_rows=7)
    kept = finalize(regions, UTM, TRANSFORM, min_area_m2=4.0 * 5)
    assert kept and all(r.pixel_count >= 5 for r in kept)
    assert len(kept) == sum(r.pixel_count >= 5 for r in regions)


def test_simplify_keeps_polygons_valid_non_empty_and_neighbours_edge_matched(tmp_path):
    rng = np.random.default_rng(1)
    classes = ndimage.zoom(rng.integers(0, 4, (8, 8)), 6, order=0).astype(np.uint8)
    classes[rng.random(classes.shape) < 0.03] = 1  # single pixels: must not vanish or break
    path = write_raster(tmp_path / "noisy.tif", classes)
    regions = vectorize_class_raster(path, None, skip_values=(), strip_rows=7)
    simplified = finalize(regions, UTM, TRANSFORM, simplify=5.0)
    assert len(simplified) == len(regions)
    geometries = np.array([r.geometry for r in simplified])
    assert shapely.is_valid(geometries).all() and not shapely.is_empty(geometries).any()
    assert (
        shapely.get_num_coordinates(geometries).sum()
        < shapely.get_num_coordinates(np.array([r.geometry for r in regions])).sum()
    )
    # Still a coverage of the raster: no overlaps, no gaps, same total area.
    assert shapely.coverage_is_valid(geometries)
    total = shapely.union_all(geometries)
    assert total.area == pytest.approx(classes.size * 4.0)
    assert sum(r.area_m2 for r in simplified) == pytest.approx(classes.size * 4.0)


@pytest.mark.parametrize("tolerance", [30.0, 200.0])
def test_a_large_simplify_tolerance_keeps_the_rasters_edge_and_corners_covered(tmp_path, tolerance):
    rng = np.random.default_rng(4)
    classes = ndimage.zoom(rng.integers(0, 3, (5, 6)), 12, order=0).astype(np.uint8)  # 60 x 72 px, 2 m
    classes[20:30, 30:45] = 254  # unclassified: a gap, not part of the frame
    path = write_raster(tmp_path / "blocks.tif", classes)
    regions = vectorize_class_raster(path, None, skip_values=(254,), strip_rows=16)
    simplified = finalize(regions, UTM, TRANSFORM, simplify=tolerance)
    geometries = np.array([r.geometry for r in simplified])
    assert shapely.is_valid(geometries).all() and shapely.coverage_is_valid(geometries)
    frame = shapely.box(500000, 4000000 - 120, 500000 + 144, 4000000)
    union = shapely.union_all(geometries)
    # Every corner and every side of the raster still lies on a polygon; nothing reaches beyond it.
    for x, y in shapely.get_coordinates(frame.exterior):
        assert union.distance(shapely.Point(x, y)) == 0
    assert union.boundary.intersection(frame.exterior).length == pytest.approx(frame.exterior.length)
    assert shapely.difference(union, frame).area == 0
    # The sides are straight: no ring keeps a vertex between two others on the same side of the raster.
    for geometry in geometries:
        ring = np.asarray(geometry.exterior.coords)[:-1]
        for axis, edge in ((0, 500000), (0, 500144), (1, 3999880), (1, 4000000)):
            here = ring[:, axis] == edge
            assert not (here & np.roll(here, 1) & np.roll(here, -1)).any()


@pytest.mark.parametrize("strip_rows", [2, 5, 64])
def test_noisy_raster_round_trips_through_polygons(tmp_path, strip_rows):
    classes = np.random.default_rng(2).integers(0, 3, (37, 41)).astype(np.uint8)
    path = write_raster(tmp_path / "noise.tif", classes)
    regions = vectorize_class_raster(path, None, skip_values=(), strip_rows=strip_rows)
    assert len(regions) == expected_region_count(classes, skip=())
    assert all(r.geometry.is_valid for r in regions)
    np.testing.assert_array_equal(rasterize(regions, classes.shape), classes)


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 1), (np.int16, -3), (np.uint32, 70_000), (np.float32, 2)])
@pytest.mark.parametrize("strip_rows", [3, 1024])
@pytest.mark.parametrize("blur", [0.8, 3.0])  # fragmented (short runs) or smooth (few long runs)
def test_every_region_holds_exactly_the_pixels_of_its_connected_component(tmp_path, dtype, scale, strip_rows, blur):
    """Speckle with holes, islands and corner touches: each polygon's pixel count, score sum and maximum
    are those of one 4-connected component found by scipy, for class rasters of any value type."""
    rng = np.random.default_rng(5)
    codes = ndimage.gaussian_filter(rng.random((4, 53, 47)), (0, blur, blur)).argmax(0)
    codes[rng.random(codes.shape) < 0.03] = 4  # scattered nodata pixels, inside regions too
    classes = (codes * scale).astype(dtype)
    nodata = 4 * scale
    scores = rng.random(codes.shape).astype(np.float32)
    class_path = write_raster(tmp_path / "speckle.tif", classes, nodata=nodata)
    regions = vectorize_class_raster(class_path, write_raster(tmp_path / "scores.tif", scores), strip_rows=strip_rows)

    truth = []
    for code in range(4):
        labels, n = ndimage.label(codes == code, structure=FOUR)
        for region in range(1, n + 1):
            pixels = labels == region
            truth.append((float(code * scale), int(pixels.sum()), float(scores[pixels].astype(np.float64).sum()),
                          float(scores[pixels].max())))
    found = [(float(r.class_id), r.pixel_count, r.score_sum, r.score_max) for r in regions]
    assert len(found) == len(truth) > (300 if blur < 1 else 40)  # 372 and 42 regions
    for got, want in zip(sorted(found), sorted(truth)):
        assert got[:2] == want[:2] and got[3] == want[3]
        assert got[2] == pytest.approx(want[2], rel=1e-12)
    burned = rasterio.features.rasterize([(r.geometry, round(r.class_id / scale)) for r in regions],
                                         out_shape=codes.shape, transform=TRANSFORM, fill=4, dtype=np.uint8)
    np.testing.assert_array_equal(burned, codes)


def test_a_strips_regions_are_scipys_connected_components_with_their_polygons():
    """A strip's regions, found through its runs, are the 4-connected components scipy labels class
    by class (islands in holes of holes, one-pixel holes, nodata, diagonal touches), each with the
    polygon GDAL draws around that component."""
    from backend.engine.vectorize import _strip_polygons

    rng = np.random.default_rng(9)
    speckle = ndimage.gaussian_filter(rng.random((3, 40, 70)), (0, 1.0, 1.0)).argmax(0).astype(np.uint8)
    speckle[rng.random(speckle.shape) < 0.05] = 255
    rings = np.zeros((40, 70), np.uint8)
    rings[4:36, 4:36] = 1
    rings[8:32, 8:32] = 2
    rings[12:28, 12:28] = 255  # nodata in the hole of a hole
    rings[16:24, 16:24] = 1    # and an island in it
    rings[2::4, 40::3] = 3     # isolated pixels: many one-pixel holes in class 0
    stripes = np.tile(np.array([[1, 2], [2, 1]], np.uint8), (5, 9))  # a checkerboard: every pixel a region
    for classes in (speckle, rings, seam_crossing_classes(), stripes, np.full((1, 9), 255, np.uint8)):
        truth = np.zeros(classes.shape, np.int64)
        for value in np.unique(classes[classes != 255]):
            labels, _ = ndimage.label(classes == value, structure=FOUR)
            truth[labels > 0] = labels[labels > 0] + truth.max()
        runs, polygons = _strip_polygons(classes, {255}, 5, 7)
        ids = runs.region_ids
        assert runs.n == len(polygons) == ids.max() == expected_region_count(classes)
        np.testing.assert_array_equal(ids == 0, classes == 255)
        np.testing.assert_array_equal(runs.region_classes[ids[ids > 0] - 1], classes[ids > 0])
        np.testing.assert_array_equal(runs.counts, np.bincount(ids.ravel(), minlength=runs.n + 1)[1:])
        pairs = np.unique(np.stack([ids.ravel(), truth.ravel()]), axis=1)
        assert pairs.shape[1] == runs.n + (classes == 255).any()  # one-to-one (and 0 to 0)
        first_pixel = {int(region): int(np.flatnonzero(ids.ravel() == region)[0]) for region in range(1, runs.n + 1)}
        assert sorted(first_pixel, key=first_pixel.get) == list(range(1, runs.n + 1))  # numbered in reading order
        for geometry, value in rasterio.features.shapes(truth.astype(np.int32), mask=truth > 0, connectivity=4,
                                                        transform=Affine.translation(5, 7)):
            region = ids[truth == value][0]
            assert shapely.equals(polygons[region - 1], shapely.geometry.shape(geometry))


def test_strips_handed_over_by_the_engine_give_the_polygons_of_the_file(rasters):
    """`segment` polygonises finished rows as they come (uneven strips); same regions as reading the file."""
    from backend.engine.vectorize import vectorize_strips

    classes, scores, class_path, score_path = rasters
    edges = [0, 5, 6, 19, 33, 40]
    strips = [(a, 0, classes[a:b], scores[a:b], None) for a, b in zip(edges, edges[1:])]
    streamed = vectorize_strips(iter(strips), TRANSFORM, classes.shape[1], skip_values=(255,))
    from_file = vectorize_class_raster(class_path, score_path, strip_rows=7)

    def key(region):
        return region.class_id, shapely.normalize(region.geometry).wkb, region.pixel_count

    assert sorted(map(key, streamed)) == sorted(map(key, from_file))
    assert sum(r.score_sum for r in streamed) == pytest.approx(sum(r.score_sum for r in from_file))


@pytest.mark.parametrize("strip_rows", [2, 9, 1024])
def test_blocks_handed_to_the_polygon_thread_give_the_regions_of_the_whole_window(rasters, strip_rows):
    """`segment` hands the engine's blocks (uneven heights, one-row blocks, two column chunks each top
    to bottom) to its polygon thread, which joins them into strips there: the same regions, scores,
    margins and entropies as one strip of the whole window."""
    from types import SimpleNamespace

    from backend.engine.segment import StripPolygons
    from backend.engine.vectorize import vectorize_strips

    classes, scores, _, _ = rasters
    signals = np.random.default_rng(4).random((2, *classes.shape)).astype(np.float32)
    height, width = classes.shape
    split = width // 2
    polygons = StripPolygons(TRANSFORM, width, strip_rows, None)
    for c0, c1 in ((0, split), (split, width)):
        edges = [0, 1, 2, 7, 8, 15, 16, 17, 30, height]
        for r0, r1 in zip(edges, edges[1:]):
            block = SimpleNamespace(row0=r0, col0=c0, class_ids=classes[r0:r1, c0:c1].copy(),
                                    score=scores[r0:r1, c0:c1].copy())
            polygons.add(block, signals[:, r0:r1, c0:c1].copy())
    handed = polygons.finish()
    whole = vectorize_strips(iter([(0, 0, classes, scores, signals)]), TRANSFORM, width, skip_values=(255, 254))

    def key(region):
        return (region.class_id, shapely.normalize(region.geometry).wkb, region.pixel_count,
                round(region.score_sum, 3), round(region.margin, 5), round(region.entropy, 5))

    assert len(handed) == expected_region_count(classes)
    assert sorted(map(key, handed)) == sorted(map(key, whole))


@pytest.mark.parametrize("threads", [0, 3])
def test_strip_arrays_are_used_again_once_no_strip_refers_to_them(rasters, monkeypatch, threads):
    """The polygon thread's strips are gathered into a few arrays used over and over (new arrays for
    each strip were faulted into memory page by page), and an array still referred to by a strip
    waiting in the queue or drawn ahead in a strip thread is never written over: many strips later
    the regions are still right."""
    from types import SimpleNamespace

    import backend.engine.vectorize as vectorize
    from backend.engine.segment import StripPolygons, _StripRows
    from backend.engine.vectorize import vectorize_strips

    monkeypatch.setattr(vectorize, "STRIP_THREADS", threads)

    rows = _StripRows(4, 3)
    assert not rows.in_use()
    view = rows.scores[1]
    assert rows.in_use()
    del view
    assert not rows.in_use()

    classes, scores, _, _ = rasters
    tall = np.concatenate([classes] * 6)  # 6 copies stacked: 60 strips of 3 rows
    tall_scores = np.concatenate([scores] * 6)
    signals = np.random.default_rng(8).random((2, *tall.shape)).astype(np.float32)
    polygons = StripPolygons(TRANSFORM, tall.shape[1], 3, None)
    for top in range(0, len(tall), 2):
        block = SimpleNamespace(row0=top, col0=0, class_ids=tall[top:top + 2].copy(),
                                score=tall_scores[top:top + 2].copy())
        polygons.add(block, signals[:, top:top + 2].copy())
    handed = polygons.finish()
    # queued (2), worked on, drawn ahead (threads), held as the row above, being filled
    assert len(polygons._buffers) <= 5 + threads
    whole = vectorize_strips(iter([(0, 0, tall, tall_scores, signals)]), TRANSFORM, tall.shape[1],
                             skip_values=(255, 254))

    def key(region):
        return (region.class_id, shapely.normalize(region.geometry).wkb, region.pixel_count,
                round(region.score_sum, 3), round(region.margin, 5), round(region.entropy, 5))

    assert sorted(map(key, handed)) == sorted(map(key, whole))


def gradient_beside_nodata(scores: np.ndarray, axis: int) -> np.ndarray:
    """np.gradient of the whole raster along `axis`, with a pixel without a score (NaN) treated like the space
    beyond the raster's edge: one-sided beside it, 0 between two of them."""
    values = np.moveaxis(scores.astype(np.float64), axis, 0)
    gradient = np.zeros_like(values)
    for i in range(len(values)):
        before = values[i - 1] if i > 0 else np.full(values.shape[1:], np.nan)
        after = values[i + 1] if i + 1 < len(values) else np.full(values.shape[1:], np.nan)
        for j in range(values.shape[1]):
            ends = [(k, v) for k, v in ((i - 1, before[j]), (i + 1, after[j])) if np.isfinite(v)]
            if len(ends) == 2:
                gradient[i, j] = (ends[1][1] - ends[0][1]) / 2
            elif ends and np.isfinite(values[i, j]):
                k, v = ends[0]
                gradient[i, j] = (v - values[i, j]) * (k - i)
    return np.moveaxis(gradient, 0, axis)


def whole_raster_signals(classes: np.ndarray, scores: np.ndarray, signals: np.ndarray, skip=(255,)):
    """The quality signals of every region by their definition, on the whole raster at once:
    {(class, pixel count, first pixel): (mean margin, mean entropy, mean outline score gradient)}."""
    magnitude = np.hypot(gradient_beside_nodata(scores, 1), gradient_beside_nodata(scores, 0))
    padded = np.pad(classes.astype(int), 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    outline = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    expected = {}
    for value in np.unique(classes):
        if value in skip:
            continue
        labels, n = ndimage.label(classes == value, structure=FOUR)
        for label in range(1, n + 1):
            pixels = labels == label
            first = tuple(int(i) for i in np.argwhere(pixels)[0])
            expected[(int(value), int(pixels.sum()), first)] = (
                np.nanmean(signals[0][pixels]), np.nanmean(signals[1][pixels]),
                magnitude[pixels & outline].mean())
    return expected


def chunked_strips(classes, scores, signals, strip_rows: int, chunk_edges: list[int]):
    """Strips as the engine hands them over: column chunk by column chunk, each top to bottom."""
    rows = [*range(0, classes.shape[0], strip_rows), classes.shape[0]]
    return [(a, c0, classes[a:b, c0:c1], scores[a:b, c0:c1], signals[:, a:b, c0:c1])
            for c0, c1 in zip(chunk_edges, chunk_edges[1:]) for a, b in zip(rows, rows[1:])]


def engine_blocks_polygonised(classes, scores, signals, strip_rows: int, chunk_edges: list[int]):
    """The regions `segment`'s polygon worker makes of the engine's blocks (uneven heights of 1 to 3
    rows, column chunk by column chunk), each strip handed over with the row below it."""
    from types import SimpleNamespace

    from backend.engine.segment import SKIPPED_CLASSES, StripPolygons

    polygons = StripPolygons(TRANSFORM, classes.shape[1], strip_rows, None)
    for c0, c1 in zip(chunk_edges, chunk_edges[1:]):
        top, step = 0, 0
        while top < classes.shape[0]:
            height = min(1 + step % 3, classes.shape[0] - top)
            block = SimpleNamespace(row0=top, col0=c0, class_ids=classes[top:top + height, c0:c1],
                                    score=scores[top:top + height, c0:c1])
            polygons.add(block, signals[:, top:top + height, c0:c1])
            top, step = top + height, step + 1
    assert SKIPPED_CLASSES[0] == 255
    return polygons.finish()


def test_a_strip_that_brings_its_row_below_is_worked_on_before_the_next_strip_comes():
    """The polygon worker does not wait for the next strip to learn the row below a strip's last row
    when the strip brings it (as `segment` hands them over); above/below rows stay those of the chunk."""
    from backend.engine.vectorize import _in_context

    classes = np.arange(15, dtype=np.uint8).reshape(5, 3)
    scores = classes.astype(np.float32) / 15
    asked = []

    def strips():
        asked.append(0)
        yield 0, 0, classes[:2], scores[:2], None, (classes[2], scores[2])
        asked.append(1)
        yield 2, 0, classes[2:], scores[2:], None, None
        asked.append(2)
        yield 0, 3, classes[:5], scores[:5], None  # a second chunk, without its row below: held back

    contexts = _in_context(strips())
    strip, above, below = next(contexts)
    assert asked == [0] and strip[0] == 0 and len(strip) == 5
    assert above is None and np.array_equal(below[0], classes[2]) and np.array_equal(below[1], scores[2])
    strip, above, below = next(contexts)
    assert asked == [0, 1] and strip[0] == 2
    assert np.array_equal(above[0], classes[1]) and below is None
    strip, above, below = next(contexts)
    assert asked == [0, 1, 2] and strip[1] == 3 and above is None and below is None
    assert next(contexts, None) is None


@pytest.mark.parametrize("strip_rows, chunks", [(1, [0, 30]), (4, [0, 4, 5, 30]), (1024, [0, 1, 12, 30]),
                                                (7, [0, 22, 23, 24, 30])])
def test_quality_signals_of_a_region_do_not_depend_on_the_strips(rasters, tmp_path, strip_rows, chunks):
    """Margin, entropy and outline sharpness are summed per region while polygonising: a region cut by
    strip seams and column chunk seams (some chunks one pixel wide) gets the values of its whole
    pixels, from the file or from the engine's blocks alike."""
    classes, scores, class_path, score_path = rasters
    rng = np.random.default_rng(5)
    signals = rng.random((2, *classes.shape)).astype(np.float32)
    signals[:, 3, 4] = np.nan  # a pixel without signals counts in neither mean
    scores = scores.copy()
    assert (classes == 255).any()
    scores[classes == 255] = np.nan  # nodata: the gradient of its neighbours is one-sided there
    signals_path = tmp_path / "signals.tif"
    with rasterio.open(signals_path, "w", driver="GTiff", width=classes.shape[1], height=classes.shape[0], count=2,
                       dtype="float32", crs=UTM, transform=TRANSFORM) as ds:
        ds.write(signals)
    score_path = write_raster(tmp_path / "scores_nan.tif", scores)
    expected = whole_raster_signals(classes, scores, signals)
    from backend.engine.vectorize import vectorize_strips

    assert chunks[-1] == classes.shape[1]
    strips = chunked_strips(classes, scores, signals, strip_rows, chunks)
    for regions in (vectorize_class_raster(class_path, score_path, strip_rows=strip_rows, signals_path=signals_path),
                    vectorize_strips(iter(strips), TRANSFORM, classes.shape[1]),
                    engine_blocks_polygonised(classes, scores, signals, strip_rows, chunks)):
        assert len(regions) == len(expected)
        for region in regions:
            rows, cols = np.nonzero(rasterio.features.geometry_mask([region.geometry], classes.shape, TRANSFORM,
                                                                    invert=True))
            assert region.geometry.geom_type == "Polygon" and region.geometry.is_valid
            key = (region.class_id, region.pixel_count, (int(rows[0]), int(cols[0])))
            assert (region.margin, region.entropy, region.sharpness) == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.parametrize("threads", [1, 3])
def test_strips_polygonised_ahead_in_threads_give_the_same_regions_and_hold_few_strips(rasters, monkeypatch,
                                                                                       threads):
    """On a machine with cores to spare, the polygons of the next strips are drawn in threads while the
    current strip's seams are merged: the regions, their polygons and signals are those drawn strip by
    strip in one thread, and no more than `threads` strips beyond the current one are held."""
    import threading

    from backend.engine import vectorize

    classes, scores, _, _ = rasters
    signals = np.random.default_rng(6).random((2, *classes.shape)).astype(np.float32)
    strips = chunked_strips(classes, scores, signals, 3, [0, 11, 12, 30])

    def key(region):
        return (region.class_id, shapely.normalize(region.geometry).wkb, region.pixel_count, region.score_sum,
                region.margin, region.entropy, region.sharpness)

    monkeypatch.setattr(vectorize, "STRIP_THREADS", 0)
    inline = vectorize.vectorize_strips(iter(strips), TRANSFORM, classes.shape[1])
    drawn_in = set()
    draw = vectorize._strip_polygons

    def recorded(*args):
        drawn_in.add(threading.current_thread().name)
        return draw(*args)

    monkeypatch.setattr(vectorize, "_strip_polygons", recorded)
    monkeypatch.setattr(vectorize, "STRIP_THREADS", threads)
    ahead = vectorize.vectorize_strips(iter(strips), TRANSFORM, classes.shape[1])
    assert [key(r) for r in ahead] == [key(r) for r in inline]
    assert drawn_in and all(name.startswith("farslip-strips") for name in drawn_in)

    pulled = []

    def in_context():
        for index, strip in enumerate(strips):
            pulled.append(index)
            yield strip, None, None

    polygonised = vectorize._polygonised(in_context(), {255}, threads)
    (first, _, _), (runs, polygons) = next(polygonised)
    assert first is strips[0] and len(polygons) == runs.n
    assert len(pulled) == threads + 1  # the current strip and `threads` ahead
    polygonised.close()  # the caller stops early: the strips not started are dropped


@pytest.mark.parametrize("dtype, wide", [("uint16", lambda v: 65535 - v), ("int32", lambda v: v * 65536 + 7),
                                         ("uint32", lambda v: v * 16_777_216 + 65535)])
def test_class_values_beyond_int16_keep_their_outlines_and_chunk_seams(rasters, dtype, wide):
    """Class values a 16-bit integer cannot hold (65535 reads as -1, 7 and 65543 as one value) keep
    their regions across column chunk seams and their outline sharpness at the raster's edges."""
    from backend.engine.vectorize import vectorize_strips

    classes, scores, _, _ = rasters
    values = wide(classes.astype(np.int64)).astype(dtype)
    skip = int(wide(255))
    signals = np.random.default_rng(9).random((2, *classes.shape)).astype(np.float32)
    expected = whole_raster_signals(values, scores, signals, skip=(skip,))
    strips = chunked_strips(values, scores, signals, 4, [0, 4, 5, 30])
    regions = vectorize_strips(iter(strips), TRANSFORM, classes.shape[1], skip_values=(skip,))
    assert len(regions) == len(expected)
    for region in regions:
        rows, cols = np.nonzero(rasterio.features.geometry_mask([region.geometry], classes.shape, TRANSFORM,
                                                                invert=True))
        key = (region.class_id, region.pixel_count, (int(rows[0]), int(cols[0])))
        assert (region.margin, region.entropy, region.sharpness) == pytest.approx(expected[key], rel=1e-5), key


def test_polygons_built_from_coordinates_equal_gdals_shapes_read_as_geojson():
    """Regions with holes, holes inside holes, islands and regions touching at a corner: each polygon is
    the one GeoJSON gives, vertex for vertex, ring for ring."""
    import json

    rng = np.random.default_rng(2)
    labels = ndimage.label(rng.random((120, 90)) > 0.55)[0].astype(np.int32)
    labels[40:80, 30:70] = labels.max() + 1  # a square with a ring of another region and an island inside
    labels[50:70, 40:60] = labels.max() + 1
    labels[58:62, 48:52] = labels.max() + 1
    labels[0, 0], labels[1, 1] = labels.max() + 1, labels.max() + 2  # corner contact
    shapes = [g for g, _ in rasterio.features.shapes(labels, mask=labels > 0, connectivity=4,
                                                     transform=Affine(0.5, 0, 10, 0, -0.5, 20))]
    assert any(len(g["coordinates"]) > 1 for g in shapes)
    built = polygons_of(shapes)
    expected = shapely.from_geojson([json.dumps(g) for g in shapes])
    assert len(built) == len(expected) == len(shapes)
    assert all(shapely.equals_exact(a, b, tolerance=0) for a, b in zip(built, expected))
    assert len(polygons_of([])) == 0


def test_polygon_threads_follow_the_cores_the_process_may_use():
    """A process confined to one core (taskset, a container's CPU set) starts no strip threads and one
    join thread, whatever the machine's own core count."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from backend.engine import devices, vectorize; "
            "print(devices.usable_cores(), vectorize.STRIP_THREADS, vectorize.JOIN_THREADS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["1", "0", "1"]


def test_a_border_with_nodata_is_no_edge_of_the_image(tmp_path):
    """A region cut out of a flat score by nodata has the outline sharpness of the same region at the raster's
    edge (none): nodata is not an object's edge, so the quality estimate does not rise beside it."""
    classes = np.zeros((12, 16), np.uint8)
    classes[:, 10:] = 255  # a nodata strip on the right
    scores = np.where(classes == 255, np.nan, 0.8).astype(np.float32)
    cut = vectorize_class_raster(write_raster(tmp_path / "cut.tif", classes, nodata=255),
                                 write_raster(tmp_path / "cut_scores.tif", scores))
    whole = vectorize_class_raster(write_raster(tmp_path / "whole.tif", classes[:, :10].copy(), nodata=255),
                                   write_raster(tmp_path / "whole_scores.tif", scores[:, :10].copy()))
    assert len(cut) == len(whole) == 1
    assert cut[0].sharpness == whole[0].sharpness == 0.0
    # A real step in the score beside the nodata still counts, one-sided.
    scores[:, 9] = 0.2
    [stepped] = vectorize_class_raster(write_raster(tmp_path / "cut.tif", classes, nodata=255),
                                       write_raster(tmp_path / "stepped.tif", scores))
    assert stepped.sharpness > 0.1
