"""`farslip segment INPUTS... --workers 2` on a local Ray: the same output as single-process runs.

Ray starts once for the module (the driver reuses it); work units of 256 pixels force several
chunks per raster, and the single-process references run with the engine's units set to the same
size, so every comparison is exact (bit for bit), apart from the run id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import pyproj
import pytest
import rasterio
import shapely
from rasterio.windows import Window
from isolated import start_local_ray
from typer.testing import CliRunner

from backend.engine import segment as segment_module
from backend.engine import sliding
from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

CHUNK = 448  # four crop strides: several chunks per sample raster, little halo work
CLASSES = ["-c", "water, lake", "-c", "cropland, bare field", "-c", "grassland"]
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory):
    yield from start_local_ray(tmp_path_factory, 2)


def run_segment(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


def single_run(raster: Path, out: Path, model: Path, *extra) -> None:
    """`farslip segment RASTER` in this process, with the engine's work units as small as the scaled run's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sliding, "CHUNK_ROWS", CHUNK)
        patch.setattr(sliding, "CHUNK_COLUMNS", CHUNK)
        patch.setattr(segment_module, "CHUNK_COLUMNS", CHUNK)
        result = run_segment(raster, *CLASSES, "--model", model, "--out", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output


def scaled_run(inputs, out: Path, model: Path, *extra):
    return run_segment(*inputs, *CLASSES, "--model", model, "--out", out, "--workers", 2,
                       "--chunk-size", CHUNK, *extra)


def read_layer(path: Path, where: str | None = None):
    meta, _, wkb, values = pyogrio.raw.read(path, where=where)
    return meta, shapely.from_wkb(wkb), dict(zip(meta["fields"], values))


def assert_same_fields(single: dict, merged: dict) -> None:
    for name, values in single.items():
        if name == "run_id":
            continue
        if values.dtype == object:
            assert list(values) == list(merged[name]), name
        else:
            assert np.array_equal(values, merged[name], equal_nan=True), name


def assert_no_split_polygons(geometries, classes) -> None:
    """Polygons are 4-connected regions: two of one class never share an edge (a chunk border would)."""
    tree = shapely.STRtree(geometries)
    for i, j in tree.query(geometries, predicate="touches").T:
        if i < j and classes[i] == classes[j]:
            shared = shapely.intersection(geometries[i].boundary, geometries[j].boundary)
            assert shapely.length(shared) == 0, f"polygons {i} and {j} of one class share an edge"


def write_tile(source: Path, target: Path, window: Window) -> None:
    with rasterio.open(source) as src:
        profile = src.profile | {"width": window.width, "height": window.height,
                                 "transform": src.window_transform(window)}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        profile["tiled"] = False
        with rasterio.open(target, "w", **profile) as dst:
            dst.write(src.read(window=window))


def write_vrt(path: Path, tiles: list[Path]) -> None:
    """A plain VRT mosaic of same-grid tiles (what gdalbuildvrt writes), made here without GDAL's tools."""
    with rasterio.open(tiles[0]) as first:
        crs, transform, count, dtype = first.crs, first.transform, first.count, first.dtypes[0]
        nodata = first.nodata
    boxes = []
    for tile in tiles:
        with rasterio.open(tile) as ds:
            col = round((ds.transform.c - transform.c) / transform.a)
            row = round((ds.transform.f - transform.f) / transform.e)
            boxes.append((tile, col, row, ds.width, ds.height))
    width = max(c + w for _, c, _, w, _ in boxes)
    height = max(r + h for _, _, r, _, h in boxes)
    kind = {"uint8": "Byte", "uint16": "UInt16"}[dtype]
    bands = []
    for band in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{tile.name}</SourceFilename>'
            f'<SourceBand>{band}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{c}" yOff="{r}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for tile, c, r, w, h in boxes)
        nodata_xml = f"<NoDataValue>{nodata:g}</NoDataValue>" if nodata is not None else ""
        bands.append(f'<VRTRasterBand dataType="{kind}" band="{band}">{nodata_xml}{sources}</VRTRasterBand>')
    path.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs.to_wkt()}</SRS>'
                    f'<GeoTransform>{transform.c!r}, {transform.a!r}, 0.0, {transform.f!r}, 0.0, '
                    f'{transform.e!r}</GeoTransform>{"".join(bands)}</VRTDataset>')


@pytest.fixture(scope="module")
def mosaic(shared_data, tmp_path_factory) -> Path:
    """naip_2020_5m.tif cut into two adjacent tiles, joined again by a VRT."""
    folder = tmp_path_factory.mktemp("mosaic")
    source = shared_data / "naip_2020_5m.tif"
    with rasterio.open(source) as src:
        width, height = src.width, src.height
    half = 480
    write_tile(source, folder / "west.tif", Window(0, 0, half, height))
    write_tile(source, folder / "east.tif", Window(half, 0, width - half, height))
    write_vrt(folder / "mosaic.vrt", [folder / "west.tif", folder / "east.tif"])
    return folder / "mosaic.vrt"


@pytest.fixture(scope="module")
def mosaic_runs(mosaic, tiny_model, tmp_path_factory):
    """The VRT mosaic segmented once in one process and once on two Ray workers, each with a class and a
    probability raster."""
    folder = tmp_path_factory.mktemp("mosaic-runs")
    single_run(mosaic, folder / "single.gpkg", tiny_model, "--class-raster", folder / "single.tif",
               "--prob-raster", folder / "single_probs.tif")
    result = scaled_run([mosaic], folder / "scaled.gpkg", tiny_model, "--class-raster", folder / "scaled.vrt",
                        "--prob-raster", folder / "scaled_probs.vrt")
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_a_vrt_mosaic_gives_exactly_the_single_process_polygons_class_and_probability_rasters(mosaic_runs):
    folder, output = mosaic_runs
    _, single_shapes, single = read_layer(folder / "single.gpkg")
    _, scaled_shapes, scaled = read_layer(folder / "scaled.gpkg")
    assert len(single_shapes) > 10
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(single_shapes, scaled_shapes, strict=True))
    assert_same_fields(single, scaled)
    assert set(scaled["raster"]) == {"mosaic.vrt"}
    assert_no_split_polygons(scaled_shapes, scaled["class_id"])
    with rasterio.open(folder / "single.tif") as a, rasterio.open(folder / "scaled.vrt") as b:
        assert a.crs == b.crs and a.transform == b.transform
        assert np.array_equal(a.read(1), b.read(1))
        assert b.colormap(1) == a.colormap(1)
    with rasterio.open(folder / "single_probs.tif") as a, rasterio.open(folder / "scaled_probs.vrt") as b:
        assert a.crs == b.crs and a.transform == b.transform and a.count == b.count == 3
        assert b.descriptions == a.descriptions == ("water", "cropland", "grassland")
        assert b.dtypes == a.dtypes and np.isnan(b.nodata)
        probs = b.read()
        assert np.array_equal(a.read(), probs, equal_nan=True) and np.isfinite(probs).any()
    assert len(list((folder / "scaled_probs_rasters").glob("*.tif"))) == 1
    report = json.loads((folder / "scaled.report.json").read_text())
    assert report["chunks"]["total"] == report["chunks"]["computed"] > 4  # several chunks per raster
    assert "chunks" in output and "Mpx" in output
    assert not (folder / "scaled.gpkg.partial").exists()


def _reprojected(geometries, source_wkt: str, target_wkt: str, step: float):
    transformer = pyproj.Transformer.from_crs(source_wkt, target_wkt, always_xy=True)
    dense = shapely.segmentize(np.asarray(geometries, dtype=object), step)
    return shapely.transform(dense, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def test_a_folder_of_rasters_in_three_crss_gives_the_single_process_refined_features_and_reports_bad_ones(
        shared_data, tiny_model, tmp_path):
    """With --refine edges on both sides: the engine computes each raster's halo in its chunks, the driver
    refines as `segment` does, and the refined and the unrefined (_coarse) layers both match."""
    names = ["naip_2020_5m.tif", "RGB.byte.tif", "solaris_sample_geotiff.tif"]
    folder = tmp_path / "rasters"
    folder.mkdir()
    for name in [*names, "corrupt.tif", "float.tif"]:
        (folder / name).symlink_to(shared_data / name)
    out = tmp_path / "all.gpkg"
    result = scaled_run([folder], out, tiny_model, "--quiet", "--refine", "edges")
    # Exit 5: some rasters failed, each named with its reason; the others are written.
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Failed:")]
    assert len(lines) == 2
    assert any("corrupt.tif" in line and "damaged" in line for line in lines)
    assert any("float.tif" in line and "coordinate reference" in line for line in lines)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert sorted(Path(f["raster"]).name for f in report["failed"]) == ["corrupt.tif", "float.tif"]

    meta, merged_shapes, merged = read_layer(out)
    _, coarse_shapes, coarse = read_layer(tmp_path / "all_coarse.gpkg")
    assert report["rasters"][0]["refine"]["method"] == "edges"
    first_crs = rasterio.open(folder / "RGB.byte.tif").crs  # the folder's first good raster by name
    assert pyproj.CRS.from_user_input(meta["crs"]) == pyproj.CRS.from_wkt(first_crs.to_wkt())
    assert list(dict.fromkeys(merged["raster"])) == sorted(names)
    assert np.array_equal(merged["object_id"], np.arange(1, len(merged_shapes) + 1))
    for name in names:
        single_run(folder / name, tmp_path / f"{name}.gpkg", tiny_model, "--refine", "edges")
        with rasterio.open(folder / name) as ds:
            crs, pixel = ds.crs, min(ds.res)
        for layer, shapes, fields in ((f"{name}.gpkg", merged_shapes, merged),
                                      (f"{name}_coarse.gpkg", coarse_shapes, coarse)):
            _, single_shapes, single = read_layer(tmp_path / layer)
            mine = fields["raster"] == name
            assert mine.sum() == len(single_shapes) > 0
            assert_same_fields({k: v for k, v in single.items() if k != "object_id"},
                               {k: v[mine] for k, v in fields.items()})
            expected = (single_shapes if crs == first_crs else
                        _reprojected(single_shapes, crs.to_wkt(), first_crs.to_wkt(), pixel))
            assert all(shapely.equals_exact(a, b, 1e-6) for a, b in zip(expected, shapes[mine], strict=True))
            assert_no_split_polygons(shapes[mine], fields["class_id"][mine])


def read_geoparquet(path: Path):
    """Geometries and columns of a GeoParquet file, with its 'geo' metadata."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return geo, shapely.from_wkb(columns.pop(geo["primary_column"])), columns


def test_a_killed_worker_is_restarted_and_sam_refined_output_equals_single_process_in_geoparquet(
        mosaic, tiny_model, tmp_path):
    """--refine sam runs on the driver over each raster's finished rasters, as `segment` runs it."""
    from tinymodels import save_tiny_sam

    from backend.scale.run import ScaleRequest, segment_rasters
    from backend.scale.worker import EngineSettings

    sam = save_tiny_sam(tmp_path / "tiny-sam", image_size=256)
    single_run(mosaic, tmp_path / "single.gpkg", tiny_model, "--refine", "sam", "--sam-model", sam)
    out = tmp_path / "killed.parquet"
    killed = []

    def kill_a_worker_once(done, total, pixels, total_pixels):
        if done >= 2 and not killed:
            pids = json.loads((tmp_path / "killed.parquet.partial" / "workers.json").read_text())
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    engine = EngineSettings(class_lines=["water, lake", "cropland, bare field", "grassland"],
                            model=str(tiny_model), chunk_rows=CHUNK, chunk_columns=CHUNK)
    stages: list[str] = []
    result = segment_rasters([str(mosaic)], engine, ScaleRequest(out, workers=2, refine="sam", sam_model=str(sam)),
                             progress=kill_a_worker_once, stage=stages.append)
    assert killed and result.exit_code == 0
    # What a job's status says after its last chunk, as `segment` says it (the status stayed at the last chunk).
    assert stages[-2:] == ["Making polygons, refining outlines and checking regions.", "Writing the outputs."]
    meta, expected_shapes, expected = read_layer(tmp_path / "single.gpkg")
    assert result.rasters[0]["sam"]["model"] and result.rasters[0]["refine"]["method"] == "sam"
    assert Path(result.outputs["coarse_vector"]).name == "killed_coarse.parquet"
    geo, shapes, fields = read_geoparquet(out)
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert pyproj.CRS.from_json_dict(geo["columns"]["geometry"]["crs"]) == pyproj.CRS.from_user_input(meta["crs"])
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(expected_shapes, shapes, strict=True))
    assert_same_fields(expected, fields)


def _chunk_lines(manifest: Path) -> set[str]:
    keys = set()
    for line in manifest.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "chunk" in entry:
            keys.add(entry["chunk"])
    return keys


def test_a_killed_driver_resumes_without_recomputing_finished_chunks(mosaic, mosaic_runs, tiny_model, tmp_path):
    folder, _ = mosaic_runs
    out = tmp_path / "resumed.gpkg"
    manifest = tmp_path / "resumed.gpkg.partial" / "manifest.jsonl"
    command = [sys.executable, "-m", "backend.service.cli", "segment", str(mosaic), *CLASSES, "--model",
               str(tiny_model), "--out", str(out), "--workers", "2", "--chunk-size", str(CHUNK), "--quiet"]
    driver = subprocess.Popen(command, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (manifest.exists() and len(_chunk_lines(manifest)) >= 2):
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk finished in time"
            time.sleep(0.2)
        driver.kill()  # SIGKILL: no cleanup at all
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        os.killpg(driver.pid, signal.SIGKILL)  # its local Ray, started in its session
    finished = _chunk_lines(manifest)
    assert not out.exists()

    other = run_segment(mosaic, "-c", "road", "--model", tiny_model, "--out", out, "--workers", 2,
                        "--chunk-size", CHUNK)
    assert other.exit_code == 2 and "--restart" in other.output and "other classes" in other.output

    result = scaled_run([mosaic], out, tiny_model, "--quiet")
    assert result.exit_code == 0, result.output
    chunks = json.loads(out.with_suffix(".report.json").read_text())["chunks"]
    assert chunks["resumed"] == len(finished) >= 2
    assert chunks["computed"] == chunks["total"] - len(finished) and chunks["not_computed"] == 0
    _, expected_shapes, expected = read_layer(folder / "scaled.gpkg")
    _, shapes, fields = read_layer(out)
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(expected_shapes, shapes, strict=True))
    assert_same_fields(expected, fields)


def test_a_single_process_segment_never_imports_ray(shared_data, tiny_model, tmp_path):
    code = ("import sys\n"
            "from backend.service.cli import app\n"
            "try:\n"
            f"    app(['segment', {str(shared_data / 'RGB.byte.tif')!r}, '-c', 'water', '-c', 'land', '--model', "
            f"{str(tiny_model)!r}, '--out', {str(tmp_path / 'one.gpkg')!r}, '--quiet'])\n"
            "except SystemExit as end:\n"
            "    assert not end.code, end.code\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n"
            "print('no ray')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no ray" in done.stdout, done.stderr
    assert (tmp_path / "one.gpkg").exists()


def test_a_bbox_over_a_folder_of_tiles_skips_the_tiles_it_misses(mosaic, tiny_model, tmp_path):
    """A folder of tiles cut to an area of interest: each tile the --bbox missed was a failure ('Failed: ...
    The bbox does not overlap the raster'), and the run exited 5. Now they are skipped, said once, and listed in
    the report; a bbox that misses every tile is one sentence."""
    folder = mosaic.parent
    with rasterio.open(folder / "west.tif") as west:
        left, bottom = west.bounds.left, west.bounds.bottom
    box = (left + 100, bottom + 100, left + 600, bottom + 600)  # inside the west tile only
    out = tmp_path / "aoi.gpkg"
    result = scaled_run([folder / "west.tif", folder / "east.tif"], out, tiny_model, "--bbox", *box)
    assert result.exit_code == 0, result.output
    assert "Failed" not in result.output
    assert "Skipped 1 raster(s) the --bbox does not reach" in result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["failed"] == [] and report["outside_bbox"] == [str(folder / "east.tif")]
    assert [Path(r["path"]).name for r in report["rasters"]] == ["west.tif"]
    nowhere = scaled_run([folder / "west.tif", folder / "east.tif"], tmp_path / "none.gpkg", tiny_model,
                         "--bbox", 0, 0, 10, 10)
    assert nowhere.exit_code == 2, nowhere.output
    assert "The bbox overlaps none of the 2 rasters" in nowhere.output
    assert not (tmp_path / "none.gpkg").exists()


@pytest.mark.parametrize("form", ["folder", "glob", "list"])
def test_a_folder_glob_or_list_alone_runs_as_several_rasters_without_workers(mosaic, tiny_model, tmp_path, form):
    """`farslip segment tiles/` was refused ('The raster tiles is a folder, not a file'), a glob 'does not exist'
    and a .txt list 'is not a raster GDAL can read', while two raster names without --workers ran on Ray."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in ("west.tif", "east.tif"):
        (tiles / name).write_bytes((mosaic.parent / name).read_bytes())
    (tmp_path / "list.txt").write_text("tiles/west.tif\ntiles/east.tif\n")
    given = {"folder": tiles, "glob": tiles / "*.tif", "list": tmp_path / "list.txt"}[form]
    out = tmp_path / "all.gpkg"
    result = run_segment(given, *CLASSES, "--model", tiny_model, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert sorted(Path(r["path"]).name for r in report["rasters"]) == ["east.tif", "west.tif"]


def test_chunks_of_a_raster_that_fails_while_its_pixels_are_read_are_counted(mosaic, tiny_model, tmp_path):
    """A raster whose header and overview read well but whose blocks are cut off: its chunks were in the report's
    total and in no other count."""
    full = tmp_path / "full.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8)
    with rasterio.open(full, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.Affine(1.0, 0, 500_000, 0, -1.0, 4_000_000)) as dst:
        dst.write(pixels)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:3000])
    out = tmp_path / "some.gpkg"
    result = scaled_run([mosaic.parent / "east.tif", cut], out, tiny_model, "--quiet")
    assert result.exit_code == 5, result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [Path(f["raster"]).name for f in report["failed"]] == ["cut.tif"]
    chunks = report["chunks"]
    assert chunks["total"] == chunks["resumed"] + chunks["computed"] + chunks["not_computed"]
    assert chunks["not_computed"] >= 1
