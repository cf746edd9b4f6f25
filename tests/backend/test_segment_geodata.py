"""`farslip segment` on the real sample rasters: right place, right CRS, clear errors, nothing half-written."""

import contextlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.warp import transform_bounds
from typer.testing import CliRunner

from backend.service.cli import app

CLASSES = ["-c", "water, lake", "-c", "cropland, bare field", "-c", "grassland"]
runner = CliRunner()


def segment(*args) -> "CliRunner.invoke":
    return runner.invoke(app, ["segment", *map(str, args)])


def read_layer(path: Path):
    meta, _, geometry, fields = pyogrio.raw.read(path)
    names = list(meta["fields"])
    return meta, shapely.from_wkb(geometry), {name: fields[i] for i, name in enumerate(names)}


def test_polygons_are_in_the_raster_crs_and_rasterise_back_to_the_class_raster(tiny_model, shared_data, tmp_path):
    out, classes = tmp_path / "naip.gpkg", tmp_path / "classes.tif"
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, "--model", tiny_model, "--out", out,
                     "--class-raster", classes, "--quiet")
    assert result.exit_code == 0, result.output
    meta, geoms, fields = read_layer(out)
    with rasterio.open(shared_data / "naip_2020_5m.tif") as src:
        raster_crs, bounds = src.crs, src.bounds
        footprint = src.dataset_mask() > 0
    assert rasterio.crs.CRS.from_wkt(meta["crs"] if meta["crs"].startswith(("PROJCS", "PROJCRS"))
                                     else rasterio.crs.CRS.from_user_input(meta["crs"]).to_wkt()) == raster_crs
    assert len(geoms) > 0 and all(g.is_valid for g in geoms)
    union = shapely.union_all(geoms)
    assert shapely.box(*bounds).buffer(1e-6).contains(union)
    assert set(fields) >= {"class", "class_id", "score_mean", "score_max", "area_m2", "model", "run_id"}
    with rasterio.open(classes) as ds:
        class_ids, transform = ds.read(1), ds.transform
        assert ds.crs == raster_crs and ds.colormap(1)[0][3] == 255
    burned = rasterio.features.rasterize(
        ((g, int(c)) for g, c in zip(geoms, fields["class_id"])), out_shape=class_ids.shape,
        transform=transform, fill=255, dtype="uint8")
    assert np.array_equal(burned, class_ids)
    # Every polygon lies on valid data: the nodata pixels of the raster carry no class.
    assert (class_ids[~footprint] == 255).all()
    # Areas are true metres: 5 m pixels.
    np.testing.assert_allclose(fields["area_m2"].sum(), (class_ids != 255).sum() * 25.0, rtol=1e-6)
    scores = fields["score_mean"]
    assert ((scores > 0) & (scores <= fields["score_max"] + 1e-6) & (fields["score_max"] <= 1)).all()


def test_nodata_collar_gives_no_polygons(tiny_model, shared_data, tmp_path):
    out = tmp_path / "landsat.gpkg"
    result = segment(shared_data / "RGB.byte.tif", *CLASSES, "--model", tiny_model, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    _, geoms, _ = read_layer(out)
    with rasterio.open(shared_data / "RGB.byte.tif") as src:
        valid = src.dataset_mask() > 0
        burned = rasterio.features.rasterize(((g, 1) for g in geoms), out_shape=valid.shape,
                                             transform=src.transform, fill=0, dtype="uint8")
    assert burned.any()
    assert not burned[~valid].any(), "polygons cover nodata collar pixels"
    assert burned[valid].all()


def test_bgra_uint16_raster_is_read_in_rgb_order_with_alpha_mask(tiny_model, shared_data, tmp_path):
    out, probs = tmp_path / "bgra.gpkg", tmp_path / "probs.tif"
    result = segment(shared_data / "RGBA.uint16.tif", *CLASSES, "--model", tiny_model, "--out", out,
                     "--prob-raster", probs, "--quiet")
    assert result.exit_code == 0, result.output
    import json
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["bands"] == [3, 2, 1]
    assert report["value_range"] is not None  # 16-bit data is stretched
    with rasterio.open(shared_data / "RGBA.uint16.tif") as src:
        alpha = src.read(4) > 0
    with rasterio.open(probs) as ds:
        assert ds.count == 3 and ds.dtypes[0] == "float32"
        assert ds.descriptions == ("water", "cropland", "grassland")
        p = ds.read()
    assert np.isnan(p[:, ~alpha]).all() and np.isfinite(p[:, alpha]).all()
    np.testing.assert_allclose(p[:, alpha].max(axis=0) >= 1 / 3 - 1e-6, True)


def test_sixteen_bit_panchromatic_is_stretched(tiny_model, shared_data, tmp_path):
    out = tmp_path / "solaris.gpkg"
    result = segment(shared_data / "solaris_sample_geotiff.tif", "-c", "building", "-c", "tree", "-c", "road",
                     "--model", tiny_model, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    import json
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["bands"] == [1, 1, 1]
    lo, hi = report["value_range"][0]
    assert 54 <= lo < hi <= 6615


def test_uav_rgba_raster_segments(tiny_model, shared_data, tmp_path):
    out = tmp_path / "uav.shp"
    result = segment(shared_data / "deepness_dummy_fotomap_small.tif", "-c", "maize", "-c", "bare soil",
                     "--model", tiny_model, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    _meta, geoms, _ = read_layer(out)
    assert len(geoms) > 0


def test_all_nodata_raster_gives_a_clear_message_and_no_file(tiny_model, shared_data, tmp_path):
    out = tmp_path / "none.gpkg"
    result = segment(shared_data / "all-nodata.tif", *CLASSES, "--model", tiny_model, "--out", out)
    assert result.exit_code == 4
    assert "nodata" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, words", [("corrupt.tif", "damaged"), ("float.tif", "coordinate reference"),
                                         ("missing.tif", "does not exist"), ("README.md", "not a raster")])
def test_bad_rasters_give_a_clear_error_and_no_output(tiny_model, shared_data, tmp_path, name, words):
    out = tmp_path / "bad.gpkg"
    result = segment(shared_data / name, *CLASSES, "--model", tiny_model, "--out", out)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def _raster_with_one_damaged_block(path: Path, side: int = 2048, block: int = 256) -> rasterio.Affine:
    """An 8-bit RGB GeoTIFF of deflate blocks (no nodata, no mask) whose bottom-right block holds
    garbage in every band; its transform."""
    rng = np.random.default_rng(4)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": rasterio.transform.from_origin(500000, 5_000_000, 1.0, 1.0), "tiled": True,
               "blockxsize": block, "blockysize": block, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(rng.integers(0, 256, (3, side, side), dtype=np.uint8))
    last = side // block - 1
    with rasterio.open(path) as ds:
        spans = [(int(ds.get_tag_item(f"BLOCK_OFFSET_{last}_{last}", "TIFF", bidx=b)),
                  int(ds.get_tag_item(f"BLOCK_SIZE_{last}_{last}", "TIFF", bidx=b))) for b in (1, 2, 3)]
        transform = ds.transform
    with open(path, "r+b") as raw:
        for offset, size in spans:
            raw.seek(offset)
            raw.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return transform


def test_a_damaged_block_fails_only_the_runs_that_read_it(tiny_model, tmp_path):
    """An 8-bit raster without nodata is not read whole before a run: an extent far from its damaged
    block is segmented; an extent over it stops with the sentence and writes nothing."""
    raster = tmp_path / "in" / "partly-damaged.tif"
    raster.parent.mkdir()
    transform = _raster_with_one_damaged_block(raster)
    out = tmp_path / "out"
    out.mkdir()
    left, top = transform @ (0, 0)
    right, bottom = transform @ (2048, 2048)
    clear = (left, top - 512, left + 512, top)  # the top-left 512 x 512 pixels
    damaged = (right - 512, bottom, right, bottom + 512)  # the bottom-right ones
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", out / "clear.gpkg",
                     "--bbox", *clear, "--quiet")
    assert result.exit_code == 0, result.output
    assert len(read_layer(out / "clear.gpkg")[1]) > 0
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", out / "damaged.gpkg", "--class-raster",
                     out / "damaged.tif", "--bbox", *damaged, "--quiet")
    assert result.exit_code == 2, result.output
    assert "damaged" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["clear.gpkg", "clear.report.json"]


def test_bbox_in_another_crs_selects_the_same_area(tiny_model, shared_data, tmp_path):
    raster = shared_data / "naip_2020_5m.tif"
    with rasterio.open(raster) as src:
        left, bottom, _right, _top = src.bounds
        box = (left + 1000, bottom + 800, left + 2500, bottom + 2200)
        box_ll = transform_bounds(src.crs, "EPSG:4326", *box)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    for path, bbox, crs in ((a, box, []), (b, box_ll, ["--bbox-crs", "EPSG:4326"])):
        result = segment(raster, *CLASSES, "--model", tiny_model, "--out", path.with_suffix(".gpkg"),
                         "--class-raster", path, "--bbox", *bbox, *crs, "--quiet")
        assert result.exit_code == 0, result.output
    with rasterio.open(a) as da, rasterio.open(b) as db:
        # The lat/lon box covers at least the projected box; the shared pixels agree exactly.
        assert db.bounds.left <= da.bounds.left and db.bounds.top >= da.bounds.top
        offset = ~db.transform * (da.bounds.left, da.bounds.top)
        col, row = round(offset[0]), round(offset[1])
        inner = db.read(1)[row:row + da.height, col:col + da.width]
        assert np.array_equal(inner, da.read(1))


@pytest.mark.parametrize("args, words, code", [
    (["--bbox", "0", "0", "10", "10"], "does not overlap", 2),
    (["--bbox", "5", "5", "1", "1"], "not a valid box", 2),
    (["--bbox-crs", "EPSG:99999", "--bbox", "0", "0", "1", "1"], "not a CRS", 2),
    (["--model", "no-such-model"], "Unknown model", 3),
    (["--bands", "1,2,9"], "do not exist", 2),
    (["--out", "result.txt"], "gpkg", 2),
    (["--threshold", "1.5"], "threshold", 2),
    (["--attention", "magic"], "Unknown attention variant", 2),
])
def test_bad_options_give_clear_errors(tiny_model, shared_data, tmp_path, args, words, code):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model)]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "x.gpkg")]
    else:
        args[args.index("--out") + 1] = str(tmp_path / args[args.index("--out") + 1])
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, *args)
    assert result.exit_code == code, result.output
    assert words in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_empty_class_list_is_refused(tiny_model, shared_data, tmp_path):
    result = segment(shared_data / "naip_2020_5m.tif", "-c", " , ", "--model", tiny_model,
                     "--out", tmp_path / "x.gpkg")
    assert result.exit_code == 2 and "class list is empty" in result.output


def test_existing_output_is_kept_unless_overwrite(tiny_model, shared_data, tmp_path):
    out = tmp_path / "keep.gpkg"
    out.write_bytes(b"precious")
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, "--model", tiny_model, "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_bytes() == b"precious"
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, "--model", tiny_model, "--out", out,
                     "--overwrite", "--quiet", "--bbox", 486000, 5206000, 487000, 5207000)
    assert result.exit_code == 0, result.output
    assert pyogrio.read_info(out)["features"] > 0


def test_an_output_name_taken_by_a_symbolic_link_to_nowhere_is_kept_unless_overwrite(tiny_model, shared_data, tmp_path):
    (tmp_path / "dangling.gpkg").symlink_to("nowhere.gpkg")
    (tmp_path / "loop1.gpkg").symlink_to("loop2.gpkg")
    (tmp_path / "loop2.gpkg").symlink_to("loop1.gpkg")
    (tmp_path / "shape.dbf").symlink_to("gone.dbf")
    args = [*CLASSES, "--model", tiny_model, "--bbox", 486000, 5206000, 487000, 5207000, "--quiet"]
    for name, target in (("dangling.gpkg", "nowhere.gpkg"), ("loop1.gpkg", "loop2.gpkg")):
        result = segment(shared_data / "naip_2020_5m.tif", *args, "--out", tmp_path / name)
        assert result.exit_code == 2 and f"already exists as a symbolic link to {target}" in result.output
        assert (tmp_path / name).is_symlink() and not (tmp_path / "nowhere.gpkg").exists()
    result = segment(shared_data / "naip_2020_5m.tif", *args, "--out", tmp_path / "shape.shp")
    assert result.exit_code == 2 and "would replace shape.dbf" in result.output
    result = segment(shared_data / "naip_2020_5m.tif", *args, "--out", tmp_path / "dangling.gpkg", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "dangling.gpkg").is_symlink() and pyogrio.read_info(tmp_path / "dangling.gpkg")["features"]


def test_overwriting_a_raster_output_removes_the_old_ones_overviews_and_metadata(tiny_model, shared_data, tmp_path):
    """QGIS's Build pyramids writes X.tif.ovr, its statistics X.tif.aux.xml: beside the new raster they
    described the old one (QGIS drew the zoomed-out map from the old classes)."""
    classes, probs = tmp_path / "c.tif", tmp_path / "p.tif"
    args = ["--model", tiny_model, "--out", tmp_path / "r.gpkg", "--class-raster", classes, "--prob-raster", probs,
            "--bbox", 486000, 5206000, 487000, 5207000, "--quiet"]
    assert segment(shared_data / "naip_2020_5m.tif", "-c", "water", "-c", "forest", "-c", "field", *args).exit_code == 0
    with rasterio.open(classes) as ds:
        profile = ds.profile | {"width": ds.width // 2, "height": ds.height // 2, "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
    with rasterio.open(f"{classes}.ovr", "w", **profile) as ovr:
        ovr.write(np.full((1, ovr.height, ovr.width), 2, np.uint8))
    Path(f"{probs}.aux.xml").write_text('<PAMDataset><PAMRasterBand band="1"><Description>water</Description>'
                                        "</PAMRasterBand></PAMDataset>")
    with rasterio.open(classes) as ds, rasterio.open(probs) as p:
        assert ds.overviews(1) == [2] and p.descriptions[0] == "water"  # GDAL reads them as the rasters' own

    refused = segment(shared_data / "naip_2020_5m.tif", "-c", "road", "-c", "roof", *args)
    assert refused.exit_code == 2 and Path(f"{classes}.ovr").exists() and Path(f"{probs}.aux.xml").exists()
    result = segment(shared_data / "naip_2020_5m.tif", "-c", "road", "-c", "roof", *args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not Path(f"{classes}.ovr").exists() and not Path(f"{probs}.aux.xml").exists()
    with rasterio.open(classes) as ds, rasterio.open(probs) as p:
        assert ds.overviews(1) == [] and p.descriptions == ("road", "roof")
        assert set(np.unique(ds.read(1, out_shape=(ds.height // 2, ds.width // 2)))) <= {0, 1, 254, 255}


def test_a_simplify_tolerance_in_the_wrong_units_is_said_and_the_rasters_edge_stays_covered(tiny_model, tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (3, 300, 300), dtype=np.uint8)
    raster = tmp_path / "degrees.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=rasterio.transform.from_origin(10, 50, 0.0001, 0.0001)) as ds:
        ds.write(data)
    runs = {}
    for tolerance in ("30", "0.0003"):  # metres typed for degrees; three pixels
        out = tmp_path / f"s{tolerance}.gpkg"
        result = segment(raster, "-c", "a", "-c", "b", "--model", tiny_model, "--out", out, "--simplify", tolerance,
                         "--no-region-checks", "--quiet")
        assert result.exit_code == 0, result.output
        runs[tolerance] = (json.loads(out.with_suffix(".report.json").read_text())["warnings"], read_layer(out))
    said = [w for w in runs["30"][0] if "--simplify" in w]
    assert said == ["--simplify 30 is in the units of the raster's CRS (degrees), and more than a quarter of the "
                    "area's shorter side (0.03 degrees): the polygons lose most of their shape. Give a tolerance of "
                    "about one pixel (0.0001 degrees) or a few."]
    assert not [w for w in runs["0.0003"][0] if "--simplify" in w]
    footprint = shapely.box(10, 49.97, 10.03, 50)
    for _warnings, (_meta, geometries, _fields) in runs.values():
        union = shapely.union_all(geometries)
        assert union.symmetric_difference(footprint).area == pytest.approx(0, abs=1e-12)


def test_the_class_raster_names_its_classes_for_gdal_and_qgis(tiny_model, shared_data, tmp_path, gdal_category_names):
    """QGIS's legend of the class raster said 0, 1, 2 ... 254: the names were only in CLASS_i tags."""
    classes = tmp_path / "c.tif"
    result = segment(shared_data / "naip_2020_5m.tif", "-c", "water", "-c", "forest, woods", "-c", "field",
                     "--model", tiny_model, "--out", tmp_path / "r.gpkg", "--class-raster", classes,
                     "--bbox", 486000, 5206000, 487000, 5207000, "--quiet")
    assert result.exit_code == 0, result.output
    names = gdal_category_names(classes)
    assert names[:4] == ["water", "forest", "field", ""] and names[254] == "unclassified" and len(names) == 255


def test_old_overviews_beside_a_new_raster_output_are_kept_unless_overwrite(tiny_model, shared_data, tmp_path):
    """The commit takes an earlier raster's X.tif.ovr with it: without --overwrite that is the user's file."""
    ovr = tmp_path / "c.tif.ovr"
    ovr.write_bytes(b"pyramids of a raster deleted since")
    args = [*CLASSES, "--model", tiny_model, "--out", tmp_path / "r.gpkg", "--class-raster", tmp_path / "c.tif",
            "--bbox", 486000, 5206000, 487000, 5207000, "--quiet"]
    refused = segment(shared_data / "naip_2020_5m.tif", *args)
    assert refused.exit_code == 2 and "would replace c.tif.ovr, which already exists beside it" in refused.output
    assert ovr.read_bytes() == b"pyramids of a raster deleted since" and not (tmp_path / "c.tif").exists()
    result = segment(shared_data / "naip_2020_5m.tif", *args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not ovr.exists() and (tmp_path / "c.tif").exists()


def test_threshold_leaves_low_confidence_pixels_unclassified(tiny_model, shared_data, tmp_path):
    classes = tmp_path / "c.tif"
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, "--model", tiny_model, "--out",
                     tmp_path / "t.gpkg", "--class-raster", classes, "--threshold", "0.9", "--quiet")
    assert result.exit_code == 0, result.output
    with rasterio.open(classes) as ds:
        values = set(np.unique(ds.read(1)).tolist())
    assert 254 in values


def test_scale_resamples_the_processing_grid(tiny_model, shared_data, tmp_path):
    classes = tmp_path / "half.tif"
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, "--model", tiny_model, "--out",
                     tmp_path / "h.gpkg", "--class-raster", classes, "--gsd", "10", "--quiet")
    assert result.exit_code == 0, result.output
    with rasterio.open(classes) as ds, rasterio.open(shared_data / "naip_2020_5m.tif") as src:
        assert ds.width == round(src.width / 2) and ds.height == round(src.height / 2)
        assert abs(ds.transform.a - 2 * src.transform.a) < 0.05
        assert ds.bounds.left == pytest.approx(src.bounds.left)


def test_a_window_wider_than_the_engines_column_chunks_is_polygonised_as_a_whole(tiny_model, shared_data, tmp_path,
                                                                                  monkeypatch):
    """Polygons are made beside the engine, chunk by chunk (256-pixel column chunks here, so the sample
    raster is four): they are exactly the regions of the class raster the run writes, none cut at a
    chunk seam, and each polygon's margin is the mean over all of its pixels."""
    from backend.engine import segment as segment_module
    from backend.engine import sliding
    from backend.engine.vectorize import vectorize_class_raster

    monkeypatch.setattr(sliding, "CHUNK_COLUMNS", 256)
    monkeypatch.setattr(segment_module, "CHUNK_COLUMNS", 256)
    out, classes = tmp_path / "chunks.gpkg", tmp_path / "chunks.tif"
    result = segment(shared_data / "naip_2020_5m.tif", *CLASSES, "--model", tiny_model, "--out", out,
                     "--class-raster", classes, "--quiet")
    assert result.exit_code == 0, result.output
    _, geoms, fields = read_layer(out)
    with rasterio.open(classes) as ds:
        assert ds.width > 3 * 256
    from_file = vectorize_class_raster(classes, skip_values=(254, 255))

    def key(geometry, class_id):
        return int(class_id), shapely.normalize(geometry).wkb

    assert sorted(map(key, geoms, fields["class_id"])) == sorted(key(r.geometry, r.class_id) for r in from_file)
    assert len(geoms) > 10 and all(g.geom_type == "Polygon" for g in geoms)
    margin = np.asarray(fields["margin"], float)
    assert np.isfinite(margin).all() and ((margin >= 0) & (margin <= 1)).all()
    assert not list(tmp_path.glob("*score*")) and not list(tmp_path.glob(".farslip*"))


@contextlib.contextmanager
def notes_for_the_user():
    """Every warning a run issues, as "Category: message (file:line)" in the list it yields, except the
    pending deprecations inside rasterio (its own use of affine's `*`), which Python never shows a user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning, module="rasterio")
        notes: list[str] = []
        yield notes
    notes.extend(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught)


def _random_raster(path: Path, rng: np.random.Generator) -> dict:
    """A GeoTIFF of random size, type, band count, CRS, tiling and nodata (value, NaN or none), with
    blobs of darker pixels so the classes form regions of many shapes."""
    height, width = int(rng.integers(30, 900)), int(rng.integers(30, 900))
    dtype = str(rng.choice(["uint8", "uint16", "int16", "float32"]))
    bands = int(rng.choice([1, 3, 4]))
    geographic = bool(rng.random() < 0.3)
    size = 2e-5 if geographic else float(rng.choice([0.3, 1.0, 10.0]))
    transform = (rasterio.transform.from_origin(10.0, 50.0, size, size) if geographic
                 else rasterio.transform.from_origin(500_000.0, 4_000_000.0, size, size))
    pixels = rng.random((bands, height, width))
    rows, cols = np.mgrid[0:height, 0:width]
    for _ in range(5):
        r, c, radius = rng.integers(0, height), rng.integers(0, width), rng.integers(8, 150)
        pixels[:, (rows - r) ** 2 + (cols - c) ** 2 < radius ** 2] *= rng.random()
    data = (pixels * {"uint8": 255, "uint16": 4000, "int16": 3000, "float32": 1.0}[dtype]).astype(dtype)
    nodata = None
    if rng.random() < 0.6:
        nodata = {"uint8": 0, "uint16": 0, "int16": -1, "float32": -9999.0}[dtype]
        r, c = rng.integers(0, height), rng.integers(0, width)
        data[:, r:r + int(rng.integers(1, height)), c:c + int(rng.integers(1, width))] = nodata
    if dtype == "float32" and rng.random() < 0.5:
        data[:, :int(rng.integers(1, height)), :int(rng.integers(1, 40))] = np.nan
    crs = "EPSG:4326" if geographic else "EPSG:32633"
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=bands, dtype=dtype, crs=crs,
                       transform=transform, nodata=nodata, tiled=bool(rng.random() < 0.5)) as ds:
        ds.write(data)
    return {"height": height, "width": width, "transform": transform, "geographic": geographic}


@pytest.mark.parametrize("seed", range(8))
def test_random_rasters_give_polygons_that_are_exactly_their_class_raster(tiny_model, tmp_path, monkeypatch, seed):
    """Rasters of every type, band count, nodata kind, CRS and size, with a random bbox, threshold and
    class list, processed in small engine chunks (seams across both axes): the layer's polygons are
    valid, lie in the raster's CRS, burn back onto the class raster's grid pixel for pixel (no polygon
    for unclassified or nodata pixels), and cover exactly the classified pixels' area, none twice."""
    from backend.engine import segment as segment_module
    from backend.engine import sliding

    monkeypatch.setattr(sliding, "CHUNK_COLUMNS", 320)
    monkeypatch.setattr(segment_module, "CHUNK_COLUMNS", 320)
    monkeypatch.setattr(sliding, "CHUNK_ROWS", 288)
    rng = np.random.default_rng(seed)
    raster = _random_raster(tmp_path / "random.tif", rng)
    lines = ["building", "road, street", "tree", "water"][:int(rng.integers(1, 5))]
    args = [tmp_path / "random.tif", "--model", tiny_model, "--out", tmp_path / "random.gpkg",
            "--class-raster", tmp_path / "classes.tif", "--quiet"]
    for line in lines:
        args += ["-c", line]
    if rng.random() < 0.4:
        height, width, transform = raster["height"], raster["width"], raster["transform"]
        x0, y0 = transform @ (int(rng.integers(0, width // 2)), int(rng.integers(height // 2 + 1, height + 1)))
        x1, y1 = transform @ (int(rng.integers(width // 2 + 1, width + 1)), int(rng.integers(0, height // 2)))
        args += ["--bbox", x0, y0, x1, y1]
    if rng.random() < 0.4:
        args += ["--threshold", "0.4"]
    with notes_for_the_user() as caught:
        result = segment(*args)
    assert result.exit_code == 0, result.output
    assert caught == []
    meta, geoms, fields = read_layer(tmp_path / "random.gpkg")
    with rasterio.open(tmp_path / "classes.tif") as ds:
        class_ids, transform, crs = ds.read(1), ds.transform, ds.crs
    assert crs == rasterio.crs.CRS.from_user_input("EPSG:4326" if raster["geographic"] else "EPSG:32633")
    assert rasterio.crs.CRS.from_user_input(meta["crs"]) == crs
    assert all(shapely.is_valid(geoms)) and set(fields["class_id"]) <= set(range(len(lines)))
    burned = rasterio.features.rasterize(((g, int(c)) for g, c in zip(geoms, fields["class_id"])),
                                         out_shape=class_ids.shape, transform=transform, fill=255, dtype="uint8")
    classified = class_ids < len(lines)
    assert np.array_equal(burned[classified], class_ids[classified])
    assert (burned[~classified] == 255).all()
    pixel_area = abs(transform.a * transform.e)
    assert shapely.area(geoms).sum() == pytest.approx(classified.sum() * pixel_area, rel=1e-9)


@pytest.mark.parametrize("nodata", [255, 0])
def test_transparent_pixels_of_an_rgba_raster_with_a_nodata_value_get_no_class(tiny_model, tmp_path, nodata):
    """GDAL lets a nodata value shadow the alpha band: with nodata 255, pixels that QGIS shows as
    transparent (alpha 0) would be classified. They are not, whatever the nodata value, and pixels
    that equal the nodata value in every band are masked as well."""
    rng = np.random.default_rng(3)
    data = rng.integers(20, 230, (4, 300, 280)).astype(np.uint8)
    data[3] = 255
    data[3, :, :90] = 0                    # transparent columns, their colours left as they were
    data[:3, 250:] = nodata                # rows of the nodata value in every colour band, opaque
    path = tmp_path / "rgba.tif"
    with rasterio.open(path, "w", driver="GTiff", height=300, width=280, count=4, dtype="uint8", nodata=nodata,
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(500_000, 4_000_000, 1, 1),
                       alpha="YES") as ds:
        ds.write(data)
    with rasterio.open(path) as ds:
        assert ds.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    out, classes = tmp_path / "rgba.gpkg", tmp_path / "classes.tif"
    with notes_for_the_user() as caught:
        result = segment(path, *CLASSES, "--model", tiny_model, "--out", out, "--class-raster", classes, "--quiet")
    assert result.exit_code == 0, result.output
    assert caught == []
    with rasterio.open(classes) as ds:
        class_ids = ds.read(1)
    assert (class_ids[:, :90] == 255).all()
    assert (class_ids[250:] == 255).all()
    assert (class_ids[:250, 90:] < 3).all()
    _, geoms, _ = read_layer(out)
    assert shapely.union_all(geoms).intersection(shapely.box(500_000, 4_000_000 - 300, 500_090, 4_000_000)).area == 0


def _blocks_raster(path: Path, crs: str, transform: rasterio.Affine, side: int = 240) -> Path:
    """Four colour blocks, so that the model draws a few large polygons."""
    data = np.zeros((3, side, side), np.uint8)
    half = side // 2
    data[:, :half, :half] = np.array([30, 90, 200])[:, None, None]
    data[:, :half, half:] = np.array([40, 160, 40])[:, None, None]
    data[:, half:, :half] = np.array([200, 200, 180])[:, None, None]
    data[:, half:, half:] = np.array([120, 110, 100])[:, None, None]
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(data)
    return path


def test_areas_and_gsd_of_a_web_mercator_raster_are_ground_metres(tiny_model, tmp_path):
    """A Web Mercator raster at 52 degrees north: a CRS unit is 0.62 m on the ground there, so planar
    areas would be 2.6 times too large and --gsd would pick the wrong resolution."""
    from pyproj import Geod, Transformer

    x0, y0 = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(13.0, 52.0)
    raster = _blocks_raster(tmp_path / "webmercator.tif", "EPSG:3857", rasterio.Affine(3.2, 0, x0, 0, -3.2, y0))
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "m.gpkg", "--quiet")
    assert result.exit_code == 0, result.output
    meta, geoms, fields = read_layer(tmp_path / "m.gpkg")
    assert "3857" in meta["crs"] and len(geoms) > 0
    to_lonlat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    geod = Geod(ellps="WGS84")
    for geom, area in zip(geoms, fields["area_m2"]):
        lonlat = shapely.transform(geom, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
        ground = abs(geod.geometry_area_perimeter(lonlat)[0])
        assert area == pytest.approx(ground, rel=1e-3)
        assert shapely.area(geom) / area == pytest.approx(1 / np.cos(np.radians(52)) ** 2, rel=5e-3)

    # --gsd is ground metres too: the pixels are 3.2 * cos(52) = 1.97 m, so --gsd 3.94 halves the grid.
    classes = tmp_path / "c.tif"
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "g.gpkg", "--class-raster", classes,
                     "--gsd", str(2 * 3.2 * np.cos(np.radians(52))), "--quiet")
    assert result.exit_code == 0, result.output
    with rasterio.open(classes) as ds:
        assert ds.width == pytest.approx(120, abs=1) and ds.height == pytest.approx(120, abs=1)


def test_areas_of_a_utm_raster_stay_planar_pixel_areas(tiny_model, tmp_path):
    """UTM keeps areas within 0.1 % of the ground: a pixel stays exactly its planar size there."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    classes = tmp_path / "c.tif"
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "u.gpkg", "--class-raster", classes,
                     "--quiet")
    assert result.exit_code == 0, result.output
    _, geoms, fields = read_layer(tmp_path / "u.gpkg")
    np.testing.assert_array_equal(fields["area_m2"], shapely.area(geoms))


@pytest.mark.parametrize("gsd, words", [("0.1", "between 0.4 and 64 m"), ("1000", "between 0.4 and 64 m")])
def test_a_gsd_beyond_the_engines_resampling_range_is_refused(tiny_model, tmp_path, gsd, words):
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(3.2, 0, 300_000, 0, -3.2, 5_800_000))
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "u.gpkg", "--gsd", gsd, "--quiet")
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "u.gpkg").exists()


@pytest.mark.parametrize("transform", [rasterio.Affine(10, 0, 500_000, 0, 10, 4_593_000),  # south-up
                                       rasterio.Affine(10, 0, 500_000, 0, -10, 4_600_000),  # north-up
                                       rasterio.Affine.translation(500_000, 4_600_000) * rasterio.Affine.rotation(30)
                                       * rasterio.Affine.scale(10, -10)],  # rotated by 30 degrees
                         ids=["south-up", "north-up", "rotated"])
def test_a_bbox_selects_the_pixels_under_it_on_any_grid(tiny_model, tmp_path, transform):
    """A bbox on a south-up or rotated raster once ended in rasterio's 'Bounds and transform are
    inconsistent'; now every grid gives the pixels whose box the bbox covers."""
    raster = _blocks_raster(tmp_path / "r.tif", "EPSG:32633", transform, side=300)
    centre = transform @ (150, 150)
    bbox = (centre[0] - 600, centre[1] - 400, centre[0] + 600, centre[1] + 400)
    classes = tmp_path / "c.tif"
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "r.gpkg", "--class-raster", classes,
                     "--bbox", *bbox, "--quiet")
    assert result.exit_code == 0, result.output
    inverse = ~transform
    corners = [inverse @ (x, y) for x in bbox[0::2] for y in bbox[1::2]]
    expected_cols = (np.floor(min(c for c, _ in corners)), np.ceil(max(c for c, _ in corners)))
    expected_rows = (np.floor(min(r for _, r in corners)), np.ceil(max(r for _, r in corners)))
    with rasterio.open(classes) as ds:
        col0, row0 = ~transform @ (ds.transform.c, ds.transform.f)
        assert (round(col0), round(col0) + ds.width) == expected_cols
        assert (round(row0), round(row0) + ds.height) == expected_rows
        assert ds.transform.a == transform.a and ds.transform.e == transform.e and ds.transform.b == transform.b
    _, geoms, _ = read_layer(tmp_path / "r.gpkg")
    footprint = shapely.Polygon([transform @ (c, r) for c, r in ((expected_cols[0], expected_rows[0]),
                                                                  (expected_cols[1], expected_rows[0]),
                                                                  (expected_cols[1], expected_rows[1]),
                                                                  (expected_cols[0], expected_rows[1]))])
    assert len(geoms) > 0 and shapely.union_all(geoms).difference(footprint.buffer(1e-6)).area == 0
    report = json.loads((tmp_path / "r.report.json").read_text())
    assert report["pixel_size"] == pytest.approx([10, 10])  # not [10, -10] south-up, nor 8.7 rotated
    # Nothing outside the box: on the rotated grid the pixel window (the box's envelope in pixels) is
    # 1.6 times the box; its pixels whose centres lie outside the box get no class and no polygon (the
    # polygons covered the whole window before). A pixel's half diagonal is the most they may reach out.
    box = shapely.box(*bbox)
    assert shapely.union_all(geoms).difference(box.buffer(10 * 2 ** 0.5 / 2 + 1e-6)).area == 0
    with rasterio.open(classes) as ds:
        ids = ds.read(1)
        cols, rows = np.meshgrid(np.arange(ds.width) + 0.5, np.arange(ds.height) + 0.5)
        xs, ys = ds.transform * (cols, rows)
        inside = (xs >= bbox[0]) & (xs <= bbox[2]) & (ys >= bbox[1]) & (ys <= bbox[3])
        assert (ids[~inside] == ds.nodata).all() and (ids[inside] != ds.nodata).all()
    assert sum(c["area_m2"] for c in report["class_stats"]) == pytest.approx(inside.sum() * 100, rel=1e-6)


def _plain_raster(path: Path, crs: str, transform, width: int = 200, height: int = 100) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform) as ds:
        ds.write(np.full((3, height, width), 120, np.uint8))
    return path


@pytest.mark.parametrize("bbox, bbox_crs", [
    ((179.99, -16.05, 180.01, -16.01), None),              # in the raster's own 0..360 longitudes
    ((179.99, -16.05, -179.99, -16.01), "EPSG:4326"),      # across the antimeridian, -180..180 (as typed in QGIS)
    ((-180.01, -16.05, -179.99, -16.01), "EPSG:4326"),     # the same place, one turn west
    ((3338471, -1798706, 3340697, -1794102), "EPSG:3832"),  # Pacific Mercator metres
], ids=["0..360", "across", "negative", "pacific-mercator"])
def test_a_bbox_across_the_antimeridian_selects_the_columns_under_it(tmp_path, bbox, bbox_crs):
    """A raster of lon 179.98..180.032 (0.0002 degree pixels): a box of 179.99..180.01 is columns 50..150.
    The box was cut to 179.98..179.99 (cols 0..50) or refused as off the raster."""
    from backend.engine.raster import open_source, request_window

    raster = _plain_raster(tmp_path / "dateline.tif", "EPSG:4326",
                           rasterio.Affine(0.0002, 0, 179.98, 0, -0.0002, -16.0), width=260, height=300)
    if bbox[0] > bbox[2]:  # typed across the line: the east end one turn on
        bbox = (bbox[0], bbox[1], bbox[2] + 360, bbox[3])
    with open_source(raster) as source:
        window = request_window(source, bbox, bbox_crs)
    assert window.col_off == pytest.approx(50, abs=1) and window.width == pytest.approx(100, abs=2)
    assert window.row_off == pytest.approx(50, abs=1) and window.height == pytest.approx(200, abs=2)


def test_a_bbox_around_the_other_pole_does_not_overlap_an_arctic_raster(tmp_path):
    """EPSG:3413 (north polar) cannot place the South Pole: the box's corners went to +-1e23 m and the whole
    raster was segmented. The overlap is now checked both ways."""
    from backend.engine.errors import InputError
    from backend.engine.raster import open_source, request_window

    raster = _plain_raster(tmp_path / "arctic.tif", "EPSG:3413", rasterio.Affine(30, 0, -200000, 0, -30, -2000000))
    with open_source(raster) as source:
        with pytest.raises(InputError, match=r"does not overlap the raster arctic\.tif: the raster covers "
                                             r"x -200000\.00\.\.-194000\.00, y -2003000\.00\.\.-2000000\.00"):
            request_window(source, (-100000, -100000, 100000, 100000), "EPSG:3031")
        lonlat = transform_bounds("EPSG:3413", "EPSG:4326", -199000, -2002000, -196000, -2001000)
        window = request_window(source, lonlat, "EPSG:4326")  # the raster's own place still selects it
        assert 0 < window.width < 200 and 0 < window.height < 100


@pytest.mark.parametrize("raster_crs, transform, size, bbox, bbox_crs, expected", [
    # A lat/lon box near the pole on a north polar stereographic raster (+-500 km, 1 km pixels): the box's
    # outline alone never reaches the pole it holds, so the box was refused or shrunk.
    ("EPSG:3413", rasterio.Affine(1000, 0, -500000, 0, -1000, 500000), (1000, 1000), (0, 88, 10, 89), "EPSG:4326",
     (562, 576, 92, 102)),
    ("EPSG:3413", rasterio.Affine(1000, 0, -500000, 0, -1000, 500000), (1000, 1000), (-180, 89, 180, 90),
     "EPSG:4326", (391, 391, 218, 218)),
    # A polar box on a world raster (1 degree pixels) is the whole polar cap, not a ring.
    ("EPSG:4326", rasterio.Affine(1, 0, -180, 0, -1, 90), (180, 360), (-1000000, -1000000, 1000000, 1000000),
     "EPSG:3413", (0, 0, 14, 360)),
    # A box on both sides of a world raster's antimeridian, and a world box on a raster in 0..360.
    ("EPSG:4326", rasterio.Affine(1, 0, -180, 0, -1, 90), (180, 360), (170, -5, 190, 5), None, (85, 0, 10, 360)),
    ("EPSG:4326", rasterio.Affine(0.1, 0, 170, 0, -0.1, -10), (100, 200), (-180, -20, 180, -10), None,
     (0, 0, 100, 200)),
    # Lon/lat boxes on a UTM 14N raster (lon -99.2, lat 47): a QGIS canvas zoomed out past the world in
    # EPSG:4326 (-315..315), the world in 0..360, and the raster's place in 0..360 (260.5..261) all hold
    # it; GDAL's envelope of those boxes lay east of the zone's central meridian ("does not overlap").
    ("EPSG:26914", rasterio.Affine(5, 0, 485900, 0, -5, 5209245), (100, 200), (-315, -90, 315, 90), "EPSG:4326",
     (0, 0, 100, 200)),
    ("EPSG:26914", rasterio.Affine(5, 0, 485900, 0, -5, 5209245), (100, 200), (0, -90, 360, 90), "EPSG:4326",
     (0, 0, 100, 200)),
    ("EPSG:26914", rasterio.Affine(5, 0, 485900, 0, -5, 5209245), (100, 200), (260.5, 46, 261, 48), "EPSG:4326",
     (0, 0, 100, 200)),
    ("EPSG:26914", rasterio.Affine(5, 0, 485900, 0, -5, 5209245), (100, 200), (100, 0, 300, 60), "EPSG:4326",
     (0, 0, 100, 200)),
], ids=["polar cap 0..10E", "pole itself", "world raster, 3413 box", "both edges", "0..360 raster, world box",
        "canvas past the world", "world in 0..360", "place in 0..360", "across 180"])
def test_a_bbox_over_a_pole_or_both_edges_selects_what_it_covers(tmp_path, raster_crs, transform, size, bbox,
                                                                 bbox_crs, expected):
    from backend.engine.raster import open_source, request_window

    raster = _plain_raster(tmp_path / "r.tif", raster_crs, transform, width=size[1], height=size[0])
    with open_source(raster) as source:
        window = request_window(source, bbox, bbox_crs)
    assert (window.row_off, window.col_off, window.height, window.width) == expected


def test_a_box_around_the_south_pole_does_not_meet_an_arctic_raster_at_any_size(tmp_path):
    from backend.engine.errors import InputError
    from backend.engine.raster import open_source, request_window

    raster = _plain_raster(tmp_path / "arctic.tif", "EPSG:3413", rasterio.Affine(1000, 0, -500000, 0, -1000, 500000),
                           width=1000, height=1000)
    with open_source(raster) as source:
        for half in (100_000, 1_000_000, 3_000_000):
            with pytest.raises(InputError, match=r"does not overlap the raster arctic\.tif"):
                request_window(source, (-half, -half, half, half), "EPSG:3031")


@pytest.mark.parametrize("crs, transform, ground", [
    # 2 x 5 m pixels (a scanner's along-track spacing): --gsd 4 is 2 columns -> 1 and 4 rows -> 5.
    ("EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -5.0, 5_800_000), (2.0, 5.0)),
    # Square degrees at 60 degrees north are half as wide as they are tall on the ground.
    ("EPSG:4326", rasterio.Affine(4e-5, 0, 10.0, 0, -4e-5, 60.0 + 120 * 4e-5), (4e-5 * 111_320 * 0.5, 4e-5 * 111_320)),
])
def test_gsd_gives_square_ground_pixels_whatever_shape_the_rasters_pixels_have(tiny_model, tmp_path, crs, transform,
                                                                               ground):
    """--gsd sets the ground size of the processing pixels across and down: before, only their width was
    set and the height followed in proportion (4 x 10 m for --gsd 4 on 2 x 5 m pixels), so a model
    fine-tuned at 4 m saw its objects squashed to half their height."""
    from pyproj import Geod

    raster = _blocks_raster(tmp_path / "pixels.tif", crs, transform)
    classes, out = tmp_path / "c.tif", tmp_path / "g.gpkg"
    gsd = 4.0
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", out, "--class-raster", classes,
                     "--gsd", str(gsd), "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    factors = report["processing_scale"]
    assert factors == pytest.approx([ground[0] / gsd, ground[1] / gsd], rel=2e-3)
    with rasterio.open(classes) as ds, rasterio.open(raster) as src:
        assert ds.width == round(src.width * factors[0]) and ds.height == round(src.height * factors[1])
        assert ds.bounds == pytest.approx(src.bounds)  # the same footprint, another grid
        geod = Geod(ellps="WGS84")
        if ds.crs.is_geographic:  # each processing pixel is gsd x gsd metres on the ground
            col, row = ds.width // 2, ds.height // 2
            (x0, y0), (x1, y1) = ds.transform * (col, row), ds.transform * (col + 1, row + 1)
            across = geod.inv(x0, y0, x1, y0)[2]
            down = geod.inv(x0, y0, x0, y1)[2]
        else:
            across, down = ds.transform.a, -ds.transform.e
        assert across == pytest.approx(gsd, rel=0.01) and down == pytest.approx(gsd, rel=0.01)
        # The polygons still cover exactly the class raster's pixels of their class.
        _, geoms, fields = read_layer(out)
        burned = rasterio.features.rasterize(zip(geoms, fields["class_id"]), out_shape=(ds.height, ds.width),
                                             transform=ds.transform, fill=255, dtype="uint8")
        assert (burned == ds.read(1)).mean() > 0.99


@pytest.mark.parametrize("name", ["gpkg_ortho.gpkg", "GPKG-tiles.gpkg"])
def test_a_geopackage_named_gpkg_something_is_written(tiny_model, tmp_path, name):
    """GeoPackage reserves layer names that begin with 'gpkg': a result named gpkg_ortho.gpkg (the layer
    named after the file) ended in GDAL's DataLayerError and a traceback, from the CLI and the plugin."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    out = tmp_path / name
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert pyogrio.list_layers(out)[:, 0].tolist() == [f"_{out.stem}"]
    assert pyogrio.read_info(out)["features"] > 0
    tiles = tmp_path / f"gpkg{name}"
    result = CliRunner().invoke(app, ["classify", str(raster), "-c", "water", "-c", "grass", "--model", str(tiny_model),
                                      "--tile", "64", "--out", str(tiles), "--quiet"])
    assert result.exit_code == 0, result.output
    assert pyogrio.read_info(tiles)["features"] > 0


def test_overwriting_a_geopackage_keeps_its_other_layers(tiny_model, tmp_path):
    """A GeoPackage is often a project's store (roads, parcels, an orthophoto): `--overwrite` replaced the whole
    file with the result, and the other tables were gone. Only the result's own layer is replaced now (in any
    letter case: GeoPackage names ignore it), raster tables are kept, the report names the layer, and a
    journal left by a program that had the file open is not replayed into the new file."""
    import sqlite3

    import pyogrio.raw

    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    store = tmp_path / "project dir" / "project.gpkg"
    store.parent.mkdir()
    with rasterio.open(store, "w", driver="GPKG", width=16, height=16, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000),
                       RASTER_TABLE="ortho") as ds:
        ds.write(np.full((3, 16, 16), 7, np.uint8))
    square = shapely.to_wkb(np.array([shapely.box(300_010, 5_799_700, 300_050, 5_799_750)], dtype=object))
    for name in ("roads", "Project"):  # an earlier result spelt otherwise
        pyogrio.raw.write(store, square, [np.array([name], dtype=object)], ["name"], layer=name, driver="GPKG",
                          geometry_type="Polygon", crs="EPSG:32633", append=False)

    def tables() -> list[str]:
        with sqlite3.connect(store) as db:
            return sorted(row[0] for row in db.execute("SELECT table_name FROM gpkg_contents"))

    assert tables() == ["Project", "ortho", "roads"]
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", store, "--quiet")
    assert result.exit_code == 2 and "already exists" in result.output  # still asked first
    for _ in range(2):  # replaced twice
        (store.parent / "project.gpkg-wal").write_bytes(b"a stale journal")
        result = segment(raster, *CLASSES, "--model", tiny_model, "--out", store, "--overwrite", "--quiet")
        assert result.exit_code == 0, result.output
        assert not (store.parent / "project.gpkg-wal").exists()
        assert tables() == ["ortho", "project", "roads"]
        _, _, wkb, values = pyogrio.raw.read(store, layer="roads")
        assert values[0].tolist() == ["roads"] and shapely.from_wkb(wkb)[0].equals(shapely.from_wkb(square)[0])
        with rasterio.open(store) as ortho:  # GDAL opens the raster table
            assert (ortho.read()[:3] == 7).all()
        report = json.loads(store.with_suffix(".report.json").read_text())
        assert report["layer"] == "project"
        polygons = sum(c["polygons"] for c in report["class_stats"])
        assert pyogrio.read_info(store, layer="project")["features"] == polygons
    # A GeoPackage that holds only an earlier result is simply replaced.
    alone = tmp_path / "alone.gpkg"
    for _ in range(2):
        assert segment(raster, *CLASSES, "--model", tiny_model, "--out", alone, "--overwrite", "--quiet").exit_code == 0
    assert pyogrio.list_layers(alone)[:, 0].tolist() == ["alone"]


@pytest.mark.parametrize("command", ["segment", "classify"])
@pytest.mark.parametrize("table", ["tiles", "attributes", "sqlite"])
def test_a_geopackage_table_of_the_layers_name_that_is_no_vector_layer_is_refused_before_the_run(
        tiny_model, tmp_path, command, table):
    """ortho.gpkg holding the orthophoto's tiles as table 'ortho' (or an attribute table, or a plain SQLite
    table of that name): --overwrite ran the whole segmentation, then ended in a traceback (GDAL: table
    "ortho" already exists). Now one sentence before the run; the file is untouched."""
    import sqlite3

    import pyogrio.raw

    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    store = tmp_path / "ortho.gpkg"
    square = shapely.to_wkb(np.array([shapely.box(300_010, 5_799_700, 300_050, 5_799_750)], dtype=object))
    pyogrio.raw.write(store, square, [np.array(["r"], dtype=object)], ["name"], layer="roads", driver="GPKG",
                      geometry_type="Polygon", crs="EPSG:32633")
    if table == "tiles":
        with rasterio.open(store, "w", driver="GPKG", width=16, height=16, count=3, dtype="uint8", crs="EPSG:32633",
                           transform=rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000), RASTER_TABLE="Ortho",
                           APPEND_SUBDATASET="YES") as ds:
            ds.write(np.full((3, 16, 16), 7, np.uint8))
    elif table == "attributes":
        pyogrio.raw.write(store, None, [np.array(["a"], dtype=object)], ["note"], layer="ortho", driver="GPKG",
                          append=True)
    else:
        with sqlite3.connect(store) as db:
            db.execute("CREATE TABLE ortho (note TEXT)")
    before = store.read_bytes()
    args = [command, str(raster), "-c", "water", "-c", "grass", "--model", str(tiny_model), "--out", str(store),
            "--overwrite", "--quiet"] + (["--tile", "64"] if command == "classify" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    kind = {"tiles": "raster (tiles) table", "attributes": "attribute (non-spatial) table",
            "sqlite": "SQLite table (not a GeoPackage layer)"}[table]
    article = "an" if table == "attributes" else "a"
    assert f"already holds {article} {kind}" in result.output and "choose another output name" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert store.read_bytes() == before
    assert not store.with_suffix(".report.json").exists()


@pytest.mark.parametrize("command", ["segment", "classify"])
def test_a_shapefile_output_does_not_replace_another_shapefiles_parts_without_overwrite(tiny_model, tmp_path, command):
    """t.shp is several files: with t.dbf (another shapefile's table) and t.qmd beside it but no t.shp, a run
    to t.shp overwrote the .dbf and deleted the .qmd without --overwrite."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    (tmp_path / "t.dbf").write_bytes(b"precious table")
    (tmp_path / "t.qmd").write_text("<qgis/>")
    args = [command, str(raster), "-c", "water", "-c", "grass", "--model", str(tiny_model), "--out",
            str(tmp_path / "t.shp"), "--quiet"] + (["--tile", "64"] if command == "classify" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "would replace t.dbf, t.qmd" in result.output and "--overwrite" in result.output
    assert (tmp_path / "t.dbf").read_bytes() == b"precious table" and (tmp_path / "t.qmd").exists()
    assert not (tmp_path / "t.shp").exists()
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert pyogrio.read_info(tmp_path / "t.shp")["features"] > 0


@pytest.mark.parametrize("out, parts", [("R.SHP", ["R.CPG", "R.DBF", "R.PRJ", "R.SHP", "R.SHX"]),
                                        ("R.GPKG", ["R.GPKG"]), ("R.GeoJSON", ["R.GeoJSON"]), ("R.FGB", ["R.FGB"])])
def test_outputs_named_with_upper_case_extensions_are_written_under_those_names(tiny_model, tmp_path, out, parts):
    """`--out RESULT.SHP` failed in the atomic rename after the whole run (GDAL wrote RESULT.shp, RESULT.dbf ...)
    and left the report without its polygons. Every format and the class raster take an extension in any case;
    a shapefile's parts follow it (R.SHP, R.DBF: what GDAL and QGIS open as R.SHP)."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    folder = tmp_path / "out"
    folder.mkdir()
    result = segment(raster, "-c", "water", "-c", "grass", "--model", tiny_model, "--out", folder / out,
                     "--class-raster", folder / "C.TIF", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([*parts, "C.TIF", "C.TIF.aux.xml", "R.report.json"])
    report = json.loads((folder / "R.report.json").read_text())
    assert report["outputs"]["vector"] == str(folder / out)
    _, geoms, fields = read_layer(folder / out)
    with rasterio.open(folder / "C.TIF") as ds:
        class_ids, transform = ds.read(1), ds.transform
    burned = rasterio.features.rasterize(((g, int(c)) for g, c in zip(geoms, fields["class_id"])),
                                         out_shape=class_ids.shape, transform=transform, fill=255, dtype="uint8")
    assert len(geoms) > 0 and np.array_equal(burned, class_ids)
    # Again to the lower-case name: the existing files (the report, a shapefile's parts in either case) are
    # refused without --overwrite and replaced with it.
    lower = Path(out).with_suffix(Path(out).suffix.lower())
    again = segment(raster, "-c", "water", "--model", tiny_model, "--out", folder / lower, "--quiet")
    assert again.exit_code == 2 and ("already exist" in again.output), again.output
    if out == "R.SHP":
        assert "would replace R.SHP, R.SHX, R.DBF, R.PRJ, R.CPG" in again.output
        replaced = segment(raster, "-c", "water", "-c", "grass", "--model", tiny_model, "--out", folder / "R.shp",
                           "--overwrite", "--quiet")
        assert replaced.exit_code == 0, replaced.output
        assert sorted(p.name for p in folder.iterdir() if p.stem == "R") == ["R.cpg", "R.dbf", "R.prj", "R.shp",
                                                                            "R.shx"]
        assert pyogrio.read_info(folder / "R.shp")["features"] == len(geoms)


@pytest.mark.parametrize("command", ["segment", "classify"])
def test_geojson_is_refused_for_a_crs_without_a_code_and_written_for_one_with_it(tiny_model, tmp_path, command):
    """GeoJSON records a CRS only by its code: for a raster in a PROJ-string CRS the file had no CRS and every
    reader took its metres for WGS 84 degrees. Refused before the run; an EPSG raster still writes GeoJSON."""
    custom = "+proj=tmerc +lat_0=0 +lon_0=15 +k=0.9996 +x_0=150000 +y_0=0 +ellps=GRS80 +units=m +no_defs"
    for crs, written in ((custom, False), ("EPSG:32633", True)):
        raster = _blocks_raster(tmp_path / "r.tif", crs, rasterio.Affine(2.0, 0, 150_000, 0, -2.0, 160))
        out = tmp_path / f"{command}.geojson"
        result = CliRunner().invoke(app, [command, str(raster), "-c", "water", "-c", "grass", "--model",
                                          str(tiny_model), "--out", str(out), "--quiet", "--overwrite",
                                          *(["--tile", "64"] if command == "classify" else [])])
        if written:
            assert result.exit_code == 0, result.output
            assert rasterio.crs.CRS.from_user_input(pyogrio.read_info(out)["crs"]) == rasterio.crs.CRS.from_epsg(32633)
            # Written in the raster's CRS, which RFC 7946 readers (web maps) do not read: said once, and reported.
            assert result.output.count(f"{out.name} is in EPSG:32633") == 1 and "RFC 7946" in result.output
            report = json.loads(out.with_suffix(".report.json").read_text())
            assert any("RFC 7946" in warning for warning in report["warnings"])
        else:
            assert result.exit_code == 2, result.output
            assert "GeoJSON cannot record the CRS" in result.output and ".gpkg" in result.output
            assert not out.exists()


@pytest.mark.parametrize("command", ["segment", "classify"])
def test_geojson_in_wgs84_degrees_gets_no_crs_warning(tiny_model, tmp_path, command):
    raster = _blocks_raster(tmp_path / "r.tif", "EPSG:4326", rasterio.Affine(0.0001, 0, 15.0, 0, -0.0001, 50.0))
    out = tmp_path / f"{command}.geojson"
    extra = ["--tile", "64"] if command == "classify" else []
    result = CliRunner().invoke(app, [command, str(raster), "-c", "water", "-c", "grass", "--model", str(tiny_model),
                                      "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    assert "RFC 7946" not in result.output
    assert out.exists()


def test_pixels_nodata_in_the_chosen_band_get_no_class(tiny_model, tmp_path):
    """nodata 0, band 1 empty on the left half, bands 2 and 3 full: with --bands 1 the left half is nodata
    (GDAL's dataset mask asks every band, so it was classified from band 1's fill value); the default
    bands 1, 2, 3 keep it (a pixel is masked when every band it is read from is nodata)."""
    data = np.full((3, 60, 80), 120, np.uint8)
    data[0, :, :40] = 0
    data[1, :, 60:] = np.arange(20, dtype=np.uint8) + 100
    raster = tmp_path / "nd0.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=80, height=60, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000)) as ds:
        ds.write(data)
    for bands, masked in (("1", 60 * 40), ("1,2,3", 0)):
        classes = tmp_path / f"c{bands}.tif"
        result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / f"o{bands}.gpkg",
                         "--class-raster", classes, "--bands", bands, "--quiet")
        assert result.exit_code == 0, result.output
        with rasterio.open(classes) as ds:
            ids = ds.read(1)
            assert int((ids == ds.nodata).sum()) == masked
            if masked:
                assert (ids[:, :40] == ds.nodata).all()


@pytest.mark.parametrize("command", ["segment", "classify"])
def test_the_report_lists_its_outputs_as_absolute_paths_when_they_were_given_relative(tiny_model, tmp_path,
                                                                                       monkeypatch, command):
    """`--out o1/r.gpkg` run in the data folder: the report (o1/r.report.json) said "o1/r.gpkg", which read from
    the report's own folder points at o1/o1/r.gpkg."""
    _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o1").mkdir()
    extra = ["--tile", "64"] if command == "classify" else ["--class-raster", "o1/cls.tif"]
    result = CliRunner().invoke(app, [command, "utm.tif", "-c", "water", "-c", "grass", "--model", str(tiny_model),
                                      "--out", "o1/r.gpkg", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    outputs = json.loads((tmp_path / "o1" / "r.report.json").read_text())["outputs"]
    assert outputs["vector"] == str(tmp_path / "o1" / "r.gpkg")
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in outputs.values()), outputs


@pytest.mark.parametrize("options, words", [
    (["--threshold", "0.99"], "No polygon was drawn: no pixel's most likely class reached --threshold 0.99. Lower it"),
    (["--min-area", "1e9"], "No polygon was drawn: every region was smaller than --min-area 1e+09 m². Lower it"),
    (["--threshold", "0.99", "--min-area", "1e9"], "--threshold 0.99 or every region was smaller than --min-area"),
])
def test_a_run_that_draws_no_polygon_says_which_option_left_nothing(tiny_model, tmp_path, options, words):
    """Every class showed 0 polygons, exit 0, and the report's warnings were empty."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "o.gpkg", *options)
    assert result.exit_code == 0, result.output
    assert words in result.output
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert sum(entry["polygons"] for entry in report["class_stats"]) == 0
    assert any(words in warning for warning in report["warnings"])
    plain = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "p.gpkg", "--quiet")
    assert plain.exit_code == 0 and "No polygon was drawn" not in plain.output


def test_a_report_in_the_way_that_belongs_to_another_format_of_the_name_says_whose_it_is(tiny_model, tmp_path):
    """r.shp, then r.geojson: 'The run report r.report.json already exists', a file the user never named."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    assert segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "r.shp", "--quiet").exit_code == 0
    second = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "r.geojson", "--quiet")
    assert second.exit_code == 2
    assert "r.report.json already exists (the report of r.shp, another result named r" in second.output
    again = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "r.shp", "--quiet")
    assert again.exit_code == 2 and "the report of" not in again.output  # its own report: the usual sentence


def test_the_closing_line_says_the_runs_time_and_the_models_loading_apart(tiny_model, tmp_path):
    """'Wrote x.gpkg (48 tiles, 1.3 s)' for a command that took 11 s: the model's loading was in no figure."""
    raster = _blocks_raster(tmp_path / "utm.tif", "EPSG:32633", rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000))
    result = segment(raster, *CLASSES, "--model", tiny_model, "--out", tmp_path / "o.gpkg")
    assert result.exit_code == 0, result.output
    assert re.search(r"Wrote \S+o\.gpkg \(\d+ tiles, \d+\.\d s after \d+\.\d s of loading the model\)", result.output)
