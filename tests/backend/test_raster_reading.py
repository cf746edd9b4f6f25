"""Synthetic GeoTIFFs with awkward properties: palettes, NaN floats, rotation, geographic CRS."""

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.transform import Affine, from_origin
from typer.testing import CliRunner

from backend.service.cli import app
from backend.engine.errors import InputError
from backend.engine.raster import PixelWindow, open_source

runner = CliRunner()


def write(path, data, crs="EPSG:32633", transform=None, **profile):
    count, height, width = data.shape
    transform = transform or from_origin(500000, 5000000, 2.0, 2.0)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
                       crs=crs, transform=transform, **profile) as ds:
        ds.write(data)
    return path


def test_paletted_raster_is_read_through_its_colour_table(tmp_path):
    index = np.zeros((1, 60, 80), np.uint8)
    index[0, :, 40:] = 2
    path = write(tmp_path / "palette.tif", index)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, {0: (10, 20, 200, 255), 2: (30, 180, 40, 255)})
    with rasterio.open(path) as ds:
        assert ds.colorinterp[0] == ColorInterp.palette
    for bands in (None, [1], [1, 1, 1]):  # chosen or not (the plugin names the band a Paletted layer shows)
        with open_source(path, bands) as source:
            rgb, valid = source.read(PixelWindow(0, 0, 60, 80))
        assert valid.all()
        assert rgb[:, 0, 0].tolist() == [10, 20, 200] and rgb[:, 0, 79].tolist() == [30, 180, 40], bands


def test_float_raster_with_nan_holes_masks_them(tmp_path):
    data = np.random.default_rng(0).uniform(0, 1000, (3, 50, 70)).astype(np.float32)
    data[:, 10:20, 10:30] = np.nan
    path = write(tmp_path / "float.tif", data)
    with open_source(path) as source:
        rgb, valid = source.read(PixelWindow(0, 0, 50, 70))
        assert source.value_range is not None
    assert not valid[10:20, 10:30].any() and valid.sum() == 50 * 70 - 200
    assert np.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 255


@pytest.mark.parametrize("scale", [0.5, 0.37, 2.0])
def test_resampled_nan_holes_are_masked_like_nodata_holes_and_grow_by_no_pixel(tmp_path, scale):
    """Resampled (--scale, --gsd) a NaN hole grew by a ring of pixels (bilinear spreads NaN to the pixels next to
    it), which got no class and no polygon although their source pixels are all valid."""
    data = np.random.default_rng(0).uniform(0, 1, (3, 200, 200)).astype(np.float32)
    holes = {}
    for name, fill in (("nan", np.nan), ("nodata", -9999.0)):
        holed = data.copy()
        holed[:, 60:100, 60:100] = fill
        with open_source(write(tmp_path / f"{name}.tif", holed, nodata=-9999.0), scale=scale) as source:
            rgb, valid = source.read(PixelWindow(0, 0, source.height, source.width))
        assert np.isfinite(rgb).all()
        holes[name] = ~valid
    assert holes["nan"].sum() == holes["nodata"].sum() > 0
    assert (holes["nan"] == holes["nodata"]).all()


@pytest.mark.parametrize("kind", ["none", "nodata", "alpha", "internal mask", "sidecar mask"])
def test_validity_follows_every_kind_of_mask_and_a_raster_without_one_is_all_valid(tmp_path, kind):
    """Only a raster with no nodata, alpha or mask band skips reading its mask: every other kind
    masks exactly the pixels rasterio's dataset mask masks, in full and decimated reads alike."""
    rng = np.random.default_rng(3)
    data = rng.integers(1, 255, (3, 70, 90), dtype=np.uint8)
    hole = np.zeros((70, 90), bool)
    hole[20:45, 30:70] = True
    path, profile = tmp_path / f"{kind.replace(' ', '_')}.tif", {}
    if kind == "nodata":
        data[:, hole] = 0
        profile["nodata"] = 0
    if kind == "alpha":
        data = np.concatenate([data, np.where(hole, 0, 255).astype(np.uint8)[None]])
        profile["photometric"] = "RGB"
        profile["alpha"] = "YES"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=kind == "internal mask"):
        write(path, data, **profile)
        if kind.endswith("mask"):
            with rasterio.open(path, "r+") as ds:
                ds.write_mask(np.where(hole, 0, 255).astype(np.uint8))
    assert (tmp_path / f"{path.name}.msk").exists() == (kind == "sidecar mask")
    with open_source(path) as source:
        rgb, valid = source.read(PixelWindow(0, 0, 70, 90))
        small_rgb, small_valid = source.read(PixelWindow(0, 0, 70, 90), (35, 45))
    with rasterio.open(path) as ds:
        expected, expected_small = ds.dataset_mask() > 0, ds.dataset_mask(out_shape=(35, 45)) > 0
    assert (valid == expected).all() and (small_valid == expected_small).all()
    assert valid.all() == (kind == "none") and not rgb[:, ~valid].any() and not small_rgb[:, ~small_valid].any()
    assert (rgb[:, valid] == data[:3][:, valid]).all()


def test_two_band_raster_uses_its_first_band_as_grey(tmp_path):
    data = np.stack([np.full((40, 40), 100, np.uint8), np.full((40, 40), 7, np.uint8)])
    with open_source(write(tmp_path / "two.tif", data)) as source:
        assert source.bands == [1, 1, 1]
        rgb, _ = source.read(PixelWindow(0, 0, 40, 40))
    assert (rgb == 100).all()


def test_a_guess_of_the_colour_bands_is_said_in_the_report_unless_named(tiny_model, tmp_path):
    rng = np.random.default_rng(3)
    two = write(tmp_path / "two.tif", rng.integers(0, 255, (2, 48, 48), dtype=np.uint8))
    four = write(tmp_path / "four.tif", rng.integers(0, 255, (4, 48, 48), dtype=np.uint8), photometric="MINISBLACK")
    named = write(tmp_path / "named.tif", rng.integers(0, 255, (4, 48, 48), dtype=np.uint8))
    with rasterio.open(named, "r+") as ds:
        ds.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]

    def warnings_of(raster, *extra, command="segment"):
        out = tmp_path / f"{raster.stem}-{command}-{len(extra)}.gpkg"
        result = runner.invoke(app, [command, str(raster), "-c", "a", "-c", "b", "--model", str(tiny_model),
                                     "--out", str(out), "--quiet", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(out.with_suffix(".report.json").read_text())["warnings"]

    said = [w for w in warnings_of(two) if "bands" in w]
    assert said == ["two.tif has 2 bands and names no colours: band 1 is read as grey and band 2 is not used. "
                    "Name the bands with --bands (3 numbers for red, green, blue, or 1 for grey)."]
    assert [w for w in warnings_of(two, command="classify") if "bands" in w] == said
    assert not [w for w in warnings_of(two, "--bands", "2") if "bands" in w]
    # Four bands that name no colours are read as 1, 2, 3 (DESIGN's rule, and QGIS's first view): no word.
    assert not [w for w in warnings_of(four) if "bands" in w]
    assert not [w for w in warnings_of(named) if "bands" in w]  # its colours are named: blue, green, red
    rgba = write(tmp_path / "rgba.tif", rng.integers(0, 255, (4, 48, 48), dtype=np.uint8), photometric="RGB",
                 alpha="YES")
    assert not [w for w in warnings_of(rgba) if "bands" in w]
    said = [w for w in warnings_of(rgba, "--bands", "4,3,2") if "bands" in w]
    assert said == ["--bands names band 4 of rgba.tif, an alpha (transparency) band: it is read as a colour here, "
                    "and transparent pixels are still left out. If that band is not what you meant, name others "
                    "with --bands."]


def test_a_raster_of_alpha_bands_only_is_refused_unless_a_band_is_named(tmp_path):
    raster = write(tmp_path / "alpha-only.tif", np.full((1, 32, 32), 255, np.uint8))
    with rasterio.open(raster, "r+") as ds:
        ds.colorinterp = [ColorInterp.alpha]
    with pytest.raises(InputError, match=r"alpha-only\.tif has only alpha \(transparency\) bands and no colour band"):
        open_source(raster)
    with open_source(raster, bands=[1]) as source:
        assert source.bands == [1, 1, 1]


def awkward_raster(tmp_path, kind: str, shape: tuple[int, int], rng):
    """A GeoTIFF of `shape` with masked pixels of one kind: a paletted band, NaN holes in float bands,
    a uint16 nodata value, or an alpha band."""
    if kind == "palette":
        path = write(tmp_path / "p.tif", rng.integers(0, 3, (1, *shape)).astype(np.uint8))
        with rasterio.open(path, "r+") as ds:
            ds.write_colormap(1, {0: (10, 20, 200, 255), 1: (5, 6, 7, 255), 2: (30, 180, 40, 255)})
        return path
    if kind == "float_nan":
        data = rng.uniform(-50, 900, (3, *shape)).astype(np.float32)
        data[:, 5:30, 7:40:2] = np.nan
        return write(tmp_path / "f.tif", data)
    if kind == "uint16_nodata":
        data = rng.integers(0, 4000, (3, *shape)).astype(np.uint16)
        data[:, 20:40, 10:50] = 0
        return write(tmp_path / "u.tif", data, nodata=0)
    data = rng.integers(0, 255, (4, *shape)).astype(np.uint8)
    data[3, 10:50, 30:60] = 0
    return write(tmp_path / "bgr.tif", data, photometric="RGB", alpha="YES")


@pytest.mark.parametrize("kind", ["palette", "float_nan", "uint16_nodata", "bgr_mask"])
def test_a_read_of_every_kth_row_and_column_gives_those_pixels_of_a_full_read(tmp_path, kind):
    """The quality estimate's lattice reads only every k-th row and column: the same pixels, stretch,
    palette colours and validity as a full read of the window."""
    path = awkward_raster(tmp_path, kind, (61, 83), np.random.default_rng(3))
    with open_source(path) as source:
        for window, every in ((PixelWindow(0, 0, 61, 83), 3), (PixelWindow(4, 7, 50, 71), 5),
                              (PixelWindow(2, 1, 1, 9), 2)):
            full_rgb, full_valid = source.read(window)
            rgb, valid = source.read(window, every=every)
            np.testing.assert_array_equal(rgb, full_rgb[:, ::every, ::every])
            np.testing.assert_array_equal(valid, full_valid[::every, ::every])
            if window.height > 1 and kind != "palette":
                assert not valid.all()  # the masked pixels are among those read


def test_rotated_and_geographic_rasters_segment_with_true_areas(tiny_model, tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (3, 120, 160), dtype=np.uint8)
    rotated = write(tmp_path / "rotated.tif", data,
                    transform=Affine.translation(500000, 5000000) * Affine.rotation(20) * Affine.scale(2, -2))
    geographic = write(tmp_path / "geographic.tif", data, crs="EPSG:4326",
                       transform=Affine(0.0001, 0, 10, 0, -0.0001, 50))
    for raster, pixel_m2 in ((rotated, 4.0), (geographic, None)):
        out = tmp_path / f"{raster.stem}.gpkg"
        result = runner.invoke(app, ["segment", str(raster), "-c", "a", "-c", "b", "--model", str(tiny_model),
                                     "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        _, _, _, fields = pyogrio.raw.read(out)
        total = fields[4].sum()  # area_m2
        if pixel_m2:
            assert total == pytest.approx(120 * 160 * pixel_m2, rel=1e-6)
        else:
            # 0.016 x 0.012 degrees at 50 N: about 1146 m x 1335 m.
            assert total == pytest.approx(1146.3 * 1334.7, rel=0.01)
        report = json.loads(out.with_suffix(".report.json").read_text())
        assert report["valid_pixels"] == 120 * 160


@pytest.mark.parametrize("what", ["bbox CRS", "--out-crs"])
def test_an_unknown_crs_is_one_sentence_naming_the_option_and_proj_prints_nothing(what, capfd):
    """Before any raster is read (GDAL's error handler not yet installed), PROJ would print its own line."""
    from backend.engine.errors import InputError
    from backend.engine.raster import parse_crs

    with pytest.raises(InputError, match=f"The {what} 'EPSG:99999' is not a CRS I know"):
        parse_crs("EPSG:99999", rasterio.crs.CRS.from_epsg(4326), what)
    assert parse_crs(None, rasterio.crs.CRS.from_epsg(4326), what) == rasterio.crs.CRS.from_epsg(4326)
    assert parse_crs("EPSG:32633", rasterio.crs.CRS.from_epsg(4326), what).to_epsg() == 32633
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""


@pytest.mark.parametrize("kind", ["palette", "float_nan", "uint16_nodata", "bgr_mask", "resampled"])
def test_strips_read_once_per_row_equal_full_reads_of_each_window(tmp_path, kind):
    """The engine's crop rows overlap by half; on the raster's own grid it reads the rows two strips
    share once and copies them: the same normalised pixels and validity as reading every window in
    full, with each row read once. Resampled (--scale), every window is read whole."""
    from backend.engine.dense import normalized_image
    from backend.engine.sliding import _strip_reader, crop_starts

    path = awkward_raster(tmp_path, "float_nan" if kind == "resampled" else kind, (70, 45),
                          np.random.default_rng(11))
    with open_source(path, scale=0.7 if kind == "resampled" else None) as source:
        assert source.same_in_any_window == (kind != "resampled")
        rows_read = []
        read = source.read

        def counting(window, *args, **kwargs):
            rows_read.append(window.height)
            return read(window, *args, **kwargs)

        source.read = counting
        crop = 16
        starts = crop_starts(source.height, crop, crop // 2)
        assert starts[-1] % (crop // 2)  # the last crop row is anchored at the bottom: an odd overlap
        windows = [PixelWindow(top, 3, crop, source.width - 5) for top in starts]
        strip, masked = _strip_reader(source), False
        for window in windows:
            rgb, valid = strip(window)
            masked |= not valid.all()
            full_rgb, full_valid = read(window)
            np.testing.assert_array_equal(rgb, normalized_image(full_rgb))
            np.testing.assert_array_equal(valid, full_valid)
        if kind == "resampled":
            assert rows_read == [crop] * len(windows)
        else:
            assert sum(rows_read) == source.height
        assert masked == (kind != "palette")  # masked pixels were among the rows copied and read


def test_values_beyond_float32_are_stretched_and_masked_extremes_print_nothing(tmp_path, capfd):
    """float64 values up to 1e40 were cast to inf and the raster called all nodata; ESRI's -3.4e38 nodata
    printed 'overflow encountered in multiply'."""
    ramp = np.linspace(0, 1e40, 60 * 80).reshape(1, 60, 80)
    with open_source(write(tmp_path / "huge.tif", np.repeat(ramp, 3, axis=0))) as source:
        rgb, valid = source.read(PixelWindow(0, 0, 60, 80))
    assert valid.all() and np.isfinite(rgb).all()
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, -1] == 255 and 100 < rgb[0, 30, 40] < 155
    esri = np.random.default_rng(0).uniform(0, 1, (3, 60, 80)).astype(np.float32)
    esri[:, :20] = -3.4028235e38
    with open_source(write(tmp_path / "esri.tif", esri, nodata=-3.4028235e38)) as source:
        rgb, valid = source.read(PixelWindow(0, 0, 60, 80))
    assert not valid[:20].any() and valid[20:].all() and (rgb[:, :20] == 0).all()
    assert capfd.readouterr().err == ""


def test_gsd_of_a_site_grid_comes_from_its_axis_unit():
    """A local engineering CRS (LOCAL_CS, a drone or site grid) names its unit on its axes: --gsd used to end
    in 'Linear units factor is not defined'; without a unit it is one sentence."""
    from rasterio.crs import CRS

    from backend.engine.errors import InputError
    from backend.engine.raster import native_gsd_m

    class Grid:  # what native_gsd_m reads of a dataset
        def __init__(self, wkt):
            self.crs, self.transform = CRS.from_wkt(wkt), from_origin(1000, 2000, 0.5, 0.5)
            self.width = self.height = 100

    assert native_gsd_m(Grid('LOCAL_CS["site",UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]')) == 0.5
    assert native_gsd_m(Grid('LOCAL_CS["site",UNIT["foot",0.3048],AXIS["X",EAST],AXIS["Y",NORTH]]')) \
        == pytest.approx(0.1524)
    with pytest.raises(InputError, match=r"has no known ground unit .* with --scale"):
        native_gsd_m(Grid('LOCAL_CS["site",UNIT["unknown",1],AXIS["X",EAST],AXIS["Y",NORTH]]'))


def test_a_file_of_several_rasters_names_them_instead_of_a_missing_crs(tmp_path):
    """A GeoPackage (or netCDF/HDF) of several rasters opens as none of them: it was refused as having no
    coordinate reference system, which sent the analyst to georeference a georeferenced file."""
    path = tmp_path / "two.gpkg"
    for i, table in enumerate(["north", "south"]):
        with rasterio.open(path, "w", driver="GPKG", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(500000, 5000000, 2, 2), RASTER_TABLE=table,
                           **({"APPEND_SUBDATASET": "YES"} if i else {})) as ds:
            ds.write(np.full((3, 64, 64), 90, np.uint8))
    result = runner.invoke(app, ["segment", str(path), "-c", "water", "--model", "no-such-model",
                                 "--out", str(tmp_path / "out.gpkg")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: {path} holds 2 rasters (GDAL subdatasets: GPKG:{path}:north, ")
    assert f"give the one to segment by its name, e.g. 'GPKG:{path}:north', or" in result.output
    assert f"gdal_translate 'GPKG:{path}:north' two.tif" in result.output
    assert "coordinate reference system" not in result.output and "Traceback" not in result.output


def _netcdf_and_geopackage_and_zip(tmp_path: Path) -> tuple[Path, Path, Path]:
    """One 3-band scene as a netCDF-4 file (a variable per band: Band1..Band3), a GeoPackage of two raster tables
    (south, north) and a zip holding the GeoTIFF."""
    import zipfile

    import rasterio.shutil

    data = np.random.default_rng(3).integers(0, 255, (3, 48, 64), dtype=np.uint8)
    tif = write(tmp_path / "scene.tif", data)
    nc = tmp_path / "scene.nc"
    rasterio.shutil.copy(tif, nc, driver="netCDF", FORMAT="NC4")
    gpkg = tmp_path / "tables.gpkg"
    for i, table in enumerate(["south", "north"]):
        with rasterio.open(gpkg, "w", driver="GPKG", width=64, height=48, count=3, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(500000, 5000000, 2, 2), RASTER_TABLE=table,
                           **({"APPEND_SUBDATASET": "YES"} if i else {})) as ds:
            ds.write(data)
    archive = tmp_path / "scene.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(tif, "scene.tif")
    return nc, gpkg, archive


def test_rasters_named_in_gdals_subdataset_and_archive_syntax_are_segmented(tiny_model, tmp_path, monkeypatch):
    """NETCDF:"a.nc":var, GPKG:a.gpkg:table and HDF5:"a.nc"://var were refused as missing files (the name was
    checked as a path), and /vsizip//abs/a.zip/x.tif and HDF5's '://' lost a slash in the options' pathlib.Path,
    so GDAL looked elsewhere. Each reaches GDAL as typed; a relative subdataset file is made absolute in the
    report; the file behind a subdataset is an input no output may replace."""
    nc, gpkg, archive = _netcdf_and_geopackage_and_zip(tmp_path)
    monkeypatch.chdir(tmp_path)
    names = {f'NETCDF:"{nc}":Band1': f'NETCDF:"{nc}":Band1', 'NETCDF:"scene.nc":Band2': f'NETCDF:"{nc}":Band2',
             f"GPKG:{gpkg}:north": f"GPKG:{gpkg}:north", "GPKG:tables.gpkg:south": f"GPKG:{gpkg}:south",
             f"/vsizip/{archive}/scene.tif": f"/vsizip/{archive}/scene.tif"}
    assert f"/vsizip/{archive}".startswith("/vsizip//")  # an absolute archive: the doubled slash GDAL needs
    for i, (name, recorded) in enumerate(names.items()):
        out = tmp_path / f"out{i}.gpkg"
        result = runner.invoke(app, ["segment", name, "-c", "water", "-c", "field", "--model", str(tiny_model),
                                     "--out", str(out), "--quiet"])
        assert result.exit_code == 0, (name, result.output)
        report = json.loads(out.with_suffix(".report.json").read_text())
        window = report["pixel_window"]
        assert report["raster"] == recorded and (window["height"], window["width"]) == (48, 64), name
        assert pyogrio.read_info(out)["features"] > 0
    # The HDF5 view of the netCDF-4 file opens too (its variables carry no georeferencing there: our sentence,
    # not "does not exist").
    hdf5 = runner.invoke(app, ["segment", f'HDF5:"{nc}"://Band1', "-c", "water", "--model", str(tiny_model),
                               "--out", str(tmp_path / "h.gpkg")])
    assert hdf5.exit_code == 2 and "has no coordinate reference system" in hdf5.output, hdf5.output
    missing = runner.invoke(app, ["segment", 'NETCDF:"nowhere.nc":Band1', "-c", "water", "--model", str(tiny_model),
                                  "--out", str(tmp_path / "m.gpkg")])
    assert missing.output == ('Error: The raster NETCDF:"nowhere.nc":Band1 names the file nowhere.nc, which does '
                              "not exist.\n")
    over = runner.invoke(app, ["segment", f"GPKG:{gpkg}:north", "-c", "water", "--model", str(tiny_model),
                               "--out", str(gpkg), "--overwrite"])
    assert over.exit_code == 2 and "would destroy the input" in over.output, over.output
    # classify takes the same names.
    for name in (f"/vsizip/{archive}/scene.tif", 'NETCDF:"scene.nc":Band3'):
        tiles = tmp_path / "tiles.gpkg"
        result = runner.invoke(app, ["classify", name, "-c", "water", "-c", "field", "--tile", "32", "--model",
                                     str(tiny_model), "--out", str(tiles), "--overwrite", "--quiet"])
        assert result.exit_code == 0, (name, result.output)
        assert json.loads(tiles.with_suffix(".report.json").read_text())["raster"] in (name, f'NETCDF:"{nc}":Band3')
        assert pyogrio.read_info(tiles)["features"] == 4


def test_a_vsicurl_path_with_its_url_as_typed_opens(tmp_path):
    """`/vsicurl/http://host/x.tif` (the form README gives) became `/vsicurl/http:/host/x.tif` in the options'
    pathlib.Path, which GDAL refused ("Missing url parameter"). A real HTTP server on 127.0.0.1 (a process of
    its own: GDAL holds the GIL while it opens) serves it."""
    import socket
    import subprocess
    import sys
    import time

    with rasterio.open(tmp_path / "x.tif", "w", driver="GTiff", width=32, height=16, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(2.0, 0, 300_000, 0, -2.0, 5_800_000)) as ds:
        ds.write(np.full((3, 16, 32), 90, np.uint8))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        with open_source(Path(f"/vsicurl/http://127.0.0.1:{port}/x.tif")) as source:  # as every option holds it
            assert (source.width, source.height) == (32, 16)
            rgb, valid = source.read(PixelWindow(0, 0, 16, 32))
            assert valid.all() and float(rgb.mean()) == 90.0
    finally:
        server.kill()
        server.wait()


def test_an_untagged_fill_value_is_named_instead_of_one_class_everywhere(tmp_path):
    """A float raster whose empty pixels hold ESRI's -3.4e38 without a nodata tag was stretched over
    [-3.4e38, 244]: every real value came out 255 and the raster one polygon, without a word."""
    from backend.engine.errors import InputError

    data = np.linspace(0, 250, 3 * 40 * 50, dtype=np.float32).reshape(3, 40, 50)
    data[:, :, :10] = -3.4028235e38
    path = tmp_path / "untagged.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=3, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(300_000, 5_800_000, 2, 2)) as ds:
        ds.write(data)
    with pytest.raises(InputError, match=r"Band 1 of untagged\.tif holds -3\.4028235e\+38 .*\(gdal_edit\.py -a_nodata"):
        open_source(path)
    with open_source(path, value_range=(0, 250)) as source:  # the way out the sentence names
        assert source.value_range == [(0.0, 250.0)] * 3
    with rasterio.open(path, "r+") as ds:  # and the other one
        ds.nodata = -3.4028235e38
    with open_source(path) as source:
        assert source.value_range is not None and all(hi <= 250 for _, hi in source.value_range)


def test_a_vrt_whose_source_file_is_gone_names_that_file(tiny_model, tmp_path):
    """It was called damaged or truncated, with the advice to re-export it."""
    source = write(tmp_path / "tile_a.tif", np.full((3, 40, 50), 90, np.uint8),
                   transform=from_origin(300_000, 5_000_000, 2, 2))
    vrt = tmp_path / "mosaic.vrt"
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">tile_a.tif'
        f'</SourceFilename><SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="50" ySize="40"/>'
        '<DstRect xOff="0" yOff="0" xSize="50" ySize="40"/></SimpleSource></VRTRasterBand>' for b in (1, 2, 3))
    vrt.write_text(f'<VRTDataset rasterXSize="50" rasterYSize="40"><SRS>EPSG:32633</SRS>'
                   f'<GeoTransform>300000, 2, 0, 5000000, 0, -2</GeoTransform>{bands}</VRTDataset>')
    source.unlink()
    result = CliRunner().invoke(app, ["segment", str(vrt), "-c", "water", "-c", "field", "--model", str(tiny_model),
                                      "--out", str(tmp_path / "o.gpkg"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"it refers to the file {tmp_path / 'tile_a.tif'}, which does not exist" in result.output
    assert "damaged" not in result.output and not (tmp_path / "o.gpkg").exists()
