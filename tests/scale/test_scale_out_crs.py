"""--out-crs of a scaled run: polygons over the antimeridian stay continuous in longitude and a polygon around a
pole is closed through it, all valid with their ground areas kept; an output CRS that cannot reach a raster is
refused with a sentence before the model loads; the class and probability VRTs keep the rasters' own CRS. Tiny
model, rasters of at most 400 x 400 pixels, one worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio.raw
import pyproj
import pytest
import rasterio
import shapely
from rasterio.crs import CRS as RasterCRS
from rasterio.transform import from_origin
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.scale.merge import merge_layers
from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

CLASSES = ["-c", "water", "-c", "tree"]
LOCAL = 'LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
GEOD = pyproj.Geod(ellps="WGS84")
# 179.80 .. -179.91 degrees of longitude, 16 degrees south (UTM zone 60 south, past its eastern edge).
OVER_ANTIMERIDIAN = ("EPSG:32760", from_origin(800000, 8230000, 100, 100), 300, 300)
LONLAT_PAST_180 = ("EPSG:4326", from_origin(179.8, -16.0, 0.001, 0.001), 400, 300)  # 179.8 .. 180.2
AROUND_NORTH_POLE = ("EPSG:3413", from_origin(-150000, 150000, 1000, 1000), 300, 300)  # the pole at pixel (150, 150)


def write_image(path: Path, crs, transform, width: int, height: int, seed: int) -> Path:
    """An RGB image of 6 x 6 flat patches (so it has polygons of both classes)."""
    patches = np.random.default_rng(seed).integers(0, 255, (3, 6, 6), dtype=np.uint8)
    pixels = np.kron(patches, np.ones((-(-height // 6), -(-width // 6)), dtype=np.uint8))[:, :height, :width]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform) as ds:
        ds.write(np.ascontiguousarray(pixels))
    return path


def run_segment(inputs, out: Path, model: Path, *extra):
    return CliRunner().invoke(app, ["segment", *map(str, inputs), *CLASSES, "--model", str(model), "--out", str(out),
                                    "--workers", "1", "--quiet", *map(str, extra)])


def read_layer(path: Path):
    meta, _, wkb, values = pyogrio.raw.read(path)
    return meta, shapely.from_wkb(wkb), dict(zip(meta["fields"], values))


def geodesic_area(shape) -> float:
    """Ground area in m² of a lon/lat polygon or multipolygon (its holes taken off)."""
    def ring(coords) -> float:
        lon, lat = np.asarray(coords).T
        return abs(GEOD.polygon_area_perimeter(lon, lat)[0])

    return sum(ring(part.exterior.coords) - sum(ring(hole.coords) for hole in part.interiors)
               for part in shapely.get_parts(shape))


def footprint_area(crs, transform, width: int, height: int) -> float:
    """Ground area in m² of a raster's grid: its outline, densely sampled, in lon/lat (no unwrapping: the
    geodesic polygon area takes the antimeridian and a pole inside in its stride)."""
    steps = np.linspace(0, 1, 400, endpoint=False)
    cols = np.concatenate([steps, np.ones(400), 1 - steps, np.zeros(400)]) * width
    rows = np.concatenate([np.zeros(400), steps, np.ones(400), 1 - steps]) * height
    xs, ys = transform.a * cols + transform.c, transform.e * rows + transform.f  # north-up
    lon, lat = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    return abs(GEOD.polygon_area_perimeter(lon, lat)[0])


def test_polygons_over_the_antimeridian_and_a_pole_come_out_valid_continuous_and_closed_through_the_pole(
        local_ray, tiny_model, tmp_path):
    """A UTM raster over the antimeridian gives polygons at 179.8 .. 180.1 as the lon/lat raster beside it has
    them (not a polygon 360 degrees wide), a polar stereographic raster around the north pole gives a polygon
    reaching latitude 90, and each raster's polygons cover its ground area."""
    specs = {"utm.tif": OVER_ANTIMERIDIAN, "lonlat.tif": LONLAT_PAST_180, "pole.tif": AROUND_NORTH_POLE}
    inputs = [write_image(tmp_path / "in" / name, *spec, seed=seed) for seed, (name, spec) in enumerate(specs.items())]
    out = tmp_path / "world.gpkg"
    result = run_segment(inputs, out, tiny_model, "--out-crs", "EPSG:4326")
    assert result.exit_code == 0, result.output

    meta, shapes, fields = read_layer(out)
    assert pyproj.CRS.from_user_input(meta["crs"]).to_epsg() == 4326
    assert shapely.is_valid(shapes).all(), [shapely.is_valid_reason(s) for s in shapes if not s.is_valid]
    for name, (crs, transform, width, height) in specs.items():
        mine = shapes[fields["raster"] == name]
        assert len(mine) > 1, name
        # Every polygon of a raster in its place: areas as on the ground, the raster covered once.
        assert sum(map(geodesic_area, mine)) == pytest.approx(footprint_area(crs, transform, width, height),
                                                              rel=1e-6), name
        bounds = shapely.bounds(mine)
        if name == "pole.tif":
            assert bounds[:, 3].max() == 90.0  # closed through the pole, not stopping short of it
            assert bounds[:, 1].min() > 87
        else:  # continuous: none torn across the map, all beside the lon/lat raster's own longitudes
            assert (bounds[:, 2] - bounds[:, 0]).max() <= 0.4 + 1e-9, name
            assert bounds[:, 0].min() >= 179.79 and bounds[:, 2].max() <= 180.21, name
    lonlat = shapely.bounds(shapes[fields["raster"] == "lonlat.tif"])
    assert lonlat[:, 0].min() == pytest.approx(179.8) and lonlat[:, 2].max() == pytest.approx(180.2)


def test_raster_vrts_keep_the_rasters_crs_while_the_polygons_take_out_crs(local_ray, tiny_model, tmp_path):
    """The class and probability VRTs over two UTM rasters are in UTM, the CRS of the GeoTIFFs they read,
    with every pixel in place; --out-crs EPSG:4326 reprojects the polygons only."""
    inputs = [write_image(tmp_path / "in" / "a.tif", "EPSG:32633", from_origin(500000, 5000000, 2, 2), 64, 64, 1),
              write_image(tmp_path / "in" / "b.tif", "EPSG:32633", from_origin(500128, 5000000, 2, 2), 64, 64, 2)]
    out = tmp_path / "o.gpkg"
    result = run_segment(inputs, out, tiny_model, "--out-crs", "EPSG:4326", "--class-raster", tmp_path / "o.vrt",
                         "--prob-raster", tmp_path / "p.vrt")
    assert result.exit_code == 0, result.output
    assert pyproj.CRS.from_user_input(read_layer(out)[0]["crs"]).to_epsg() == 4326
    for vrt, folder in (("o.vrt", "o_rasters"), ("p.vrt", "p_rasters")):
        with rasterio.open(tmp_path / vrt) as mosaic:
            assert mosaic.crs == RasterCRS.from_epsg(32633), vrt
            assert mosaic.transform == from_origin(500000, 5000000, 2, 2), vrt
            assert mosaic.bounds == pytest.approx((500000, 4999872, 500256, 5000000)), vrt
            whole = mosaic.read()
        for name, column in (("a.tif", 0), ("b.tif", 64)):
            with rasterio.open(tmp_path / folder / name) as part:
                assert part.crs == RasterCRS.from_epsg(32633)
                assert np.array_equal(whole[:, :, column:column + 64], part.read(), equal_nan=True), (vrt, name)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["crs"] == "EPSG:4326"


def model_never_loads(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("case, words", [
    ("local grid first", ["The raster", "utm.tif is in EPSG:32633, which cannot be transformed to the output CRS "
                          "'site grid' (the first raster's)"]),
    ("local grid second", ["The raster", "site.tif is in 'site grid', which cannot be transformed to the output "
                           "CRS EPSG:32633 (the first raster's)"]),
    ("local grid asked for", ["The raster", "utm.tif is in EPSG:32633", "cannot be transformed to --out-crs "
                              "'site grid'"]),
    ("pole in Web Mercator", ["pole.tif (EPSG:3413) reaches where --out-crs EPSG:3857 cannot represent it"]),
    ("latitude 90 in Web Mercator", ["top.tif (EPSG:4326) reaches where --out-crs EPSG:3857 cannot represent it"]),
    ("antimeridian in Web Mercator", ["utm60.tif (EPSG:32760) reaches where --out-crs EPSG:3857", "edge"]),
])
def test_an_output_crs_that_cannot_reach_a_raster_is_refused_before_the_model_loads(case, words, tiny_model,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setattr("backend.scale.run.load_segmenter", model_never_loads)
    folder = tmp_path / "in"
    site = ("site.tif", RasterCRS.from_wkt(LOCAL), from_origin(0, 3000, 10, 10), 64, 64)
    utm = ("utm.tif", "EPSG:32633", from_origin(500000, 5000000, 10, 10), 64, 64)
    rasters, extra = {
        "local grid first": ([site, utm], []),
        "local grid second": ([utm, site], []),
        "local grid asked for": ([utm], ["--out-crs", LOCAL]),
        "pole in Web Mercator": ([("pole.tif", *AROUND_NORTH_POLE)], ["--out-crs", "EPSG:3857"]),
        "latitude 90 in Web Mercator": ([("top.tif", "EPSG:4326", from_origin(10, 90, 0.01, 0.01), 100, 100)],
                                        ["--out-crs", "EPSG:3857"]),
        "antimeridian in Web Mercator": ([("utm60.tif", *OVER_ANTIMERIDIAN)], ["--out-crs", "EPSG:3857"]),
    }[case]
    inputs = [write_image(folder / name, crs, transform, width, height, seed)
              for seed, (name, crs, transform, width, height) in enumerate(rasters)]
    out = tmp_path / "o.gpkg"
    result = run_segment(inputs, out, tiny_model, *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "ProjError" not in result.output
    message = " ".join(result.output.split())
    for word in words:
        assert word in message, (word, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written, no o.gpkg.partial


def test_merging_a_layer_the_output_crs_cannot_reach_is_a_sentence_not_a_proj_error(tmp_path):
    """The last resort, behind the check before the run: the merge names the raster and both CRSs."""
    part = tmp_path / "polygons.gpkg"
    pyogrio.raw.write(part, np.array([shapely.to_wkb(shapely.box(0, 0, 10, 10))], dtype=object),
                      [np.array([1], dtype=np.int64)], ["class_id"], driver="GPKG", geometry_type="Polygon",
                      crs=LOCAL)
    with pytest.raises(InputError) as refused:
        merge_layers([(part, "site.tif", RasterCRS.from_wkt(LOCAL), 10.0)], tmp_path / "o.gpkg",
                     RasterCRS.from_epsg(32633), "o")
    assert "The polygons of site.tif cannot be transformed from 'site grid' to the output CRS EPSG:32633" in str(
        refused.value)
    assert not (tmp_path / "o.gpkg").exists()


@pytest.mark.parametrize("bbox, refused", [((10, 84, 15, 85), False), ((10, 86, 15, 90), True)])
def test_with_a_bbox_only_its_window_must_reach_the_output_crs(bbox, refused, local_ray, tiny_model, tmp_path):
    """A raster from latitude 84 to the pole: Web Mercator holds a --bbox window below 85 degrees (the rest of the
    raster does not count), and still refuses one up to the pole, with nothing written."""
    raster = write_image(tmp_path / "in" / "north.tif", "EPSG:4326", from_origin(10, 90, 0.02, 0.02), 300, 300, 3)
    out = tmp_path / "o.gpkg"
    result = run_segment([raster], out, tiny_model, "--out-crs", "EPSG:3857", "--bbox", *bbox)
    if refused:
        assert result.exit_code == 2, result.output
        assert "north.tif (EPSG:4326) reaches where --out-crs EPSG:3857 cannot represent it" in " ".join(
            result.output.split())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
        return
    assert result.exit_code == 0, result.output
    meta, shapes, _ = read_layer(out)
    assert meta["crs"] == "EPSG:3857" and len(shapes) > 0
    lon, lat = pyproj.Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(
        *shapely.get_coordinates(shapes).T)
    assert lat.min() >= 84 - 1e-6 and lat.max() <= 85 + 1e-6 and lon.min() >= 10 - 1e-6 and lon.max() <= 15 + 1e-6
