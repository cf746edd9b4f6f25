"""What a scaled run may replace, and what it reads once. `--overwrite` replaces a .vrt output's `<name>_rasters/`
folder only when every file in it is the previous output's: a source of the `<name>.vrt` beside it, or that
source's .aux.xml / .ovr (a folder of one's own GeoTIFFs named like that was deleted whole, for it held only
.tif files). No output may be the model, the weights or the class list, as in a one-raster run (only the input
rasters were protected). The files each raster reads, recorded for a resumed run, are those read when it was
planned (every raster was opened again for them). Tiny rasters, the tiny model, the real command."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from rasterio.crs import CRS
from test_scale_outputs import run_segment, write_image
from typer.testing import CliRunner

from backend.scale.merge import write_raster_vrt
from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

OUTPUTS = ("h.gpkg", "h.report.json", "c.vrt", "p.vrt", "p_rasters", "h.gpkg.partial")


def no_workers(*args, **kwargs):
    raise AssertionError("the run started computing")


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (b"<folder>" if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def own_mosaic(folder: Path, listed: list[str]) -> None:
    """c.vrt in `folder`, a mosaic of one's own over the GeoTIFFs `listed` in c_rasters/."""
    write_raster_vrt(folder / "c.vrt", [folder / "c_rasters" / name for name in listed], CRS.from_epsg(32632))


@pytest.mark.parametrize("case, unexpected", [
    ("geotiffs without a vrt", "mine.tif"),
    ("a geotiff the vrt does not read", "extra.tif"),
    ("overviews of a geotiff the vrt does not read", "extra.tif.ovr"),
    ("a geotiff in a subfolder the vrt does not read", "sub/deep.tif"),
])
def test_overwrite_keeps_a_rasters_folder_whose_files_no_run_wrote(case, unexpected, tiny_model, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr("backend.scale.run.Workers", no_workers)
    inputs = [write_image(tmp_path / "in" / "a.tif", 500000, 1)]
    folder = tmp_path / "c_rasters"
    if case == "geotiffs without a vrt":
        write_image(folder / "mine.tif", 600000, 3)
        (folder / "mine.tif.aux.xml").write_text("<PAMDataset/>")
    else:
        write_image(folder / "a.tif", 500000, 3)
        (folder / "a.tif.aux.xml").write_text("<PAMDataset/>")
        own_mosaic(tmp_path, ["a.tif"])
        if case == "a geotiff the vrt does not read":
            write_image(folder / "extra.tif", 600000, 4)
        elif case == "overviews of a geotiff the vrt does not read":
            (folder / "extra.tif.ovr").write_bytes(b"overviews")
        else:
            write_image(folder / "sub" / "deep.tif", 600000, 4)
    before = tree(tmp_path)
    result = run_segment(inputs, tmp_path, tiny_model, "--overwrite")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{folder} holds files a run did not write, such as {unexpected}" in said
    assert tree(tmp_path) == before  # nothing written, the folder and the VRT as they were


def test_overwrite_replaces_the_previous_outputs_folder_with_its_sidecars(local_ray, tiny_model, tmp_path):
    """The previous run's folders, with statistics and pyramids QGIS or GDAL added beside their GeoTIFFs, are
    replaced; one file more in them, and nothing is."""
    write_image(tmp_path / "in" / "a.tif", 500000, 1)
    write_image(tmp_path / "in" / "sub" / "b.tif", 500200, 2)
    assert run_segment([tmp_path / "in" / "a.tif", tmp_path / "in" / "sub" / "b.tif"], tmp_path,
                       tiny_model).exit_code == 0
    assert sorted(p.relative_to(tmp_path / "c_rasters").as_posix() for p in (tmp_path / "c_rasters").rglob("*.tif")) \
        == ["a.tif", "sub/b.tif"]
    (tmp_path / "c_rasters" / "a.tif.aux.xml").write_text("<PAMDataset/>")
    (tmp_path / "c_rasters" / "sub" / "b.tif.ovr").write_bytes(b"pyramids")
    (tmp_path / "p_rasters" / "sub" / "b.tif.aux.xml").write_text("<PAMDataset/>")

    (tmp_path / "p_rasters" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    refused = run_segment([tmp_path / "in" / "a.tif", tmp_path / "in" / "sub" / "b.tif"], tmp_path, tiny_model,
                          "-c", "road", "--overwrite")
    assert refused.exit_code == 2, refused.output
    assert "p_rasters holds files a run did not write, such as notes.txt" in " ".join(refused.output.split())
    assert tree(tmp_path) == before

    (tmp_path / "p_rasters" / "notes.txt").unlink()
    result = run_segment([tmp_path / "in" / "a.tif", tmp_path / "in" / "sub" / "b.tif"], tmp_path, tiny_model,
                         "-c", "road", "--overwrite")
    assert result.exit_code == 0, result.output
    for name in ("c_rasters", "p_rasters"):
        assert sorted(p.relative_to(tmp_path / name).as_posix() for p in (tmp_path / name).rglob("*")) == [
            "a.tif", "sub", "sub/b.tif"]


@pytest.mark.parametrize("case, words", [
    ("polygons over the class list", "The polygon output {tmp}/classes.gpkg is the class list {tmp}/classes.gpkg"),
    ("rasters folder at the class list", "The class list {tmp}/c_rasters is the folder of {tmp}/c.vrt's per-raster"),
    ("model in the rasters folder", "{tmp}/c_rasters holds the model {tmp}/c_rasters/tiny.safetensors"),
])
def test_no_output_replaces_the_model_or_the_class_list(case, words, tiny_model, tmp_path, monkeypatch):
    """As a one-raster run refuses them (checks.input_files), with --overwrite too."""
    monkeypatch.setattr("backend.scale.run.Workers", no_workers)
    raster = write_image(tmp_path / "in" / "a.tif", 500000, 1)
    model, out = tiny_model, tmp_path / "h.gpkg"
    classes = tmp_path / ("c_rasters" if case == "rasters folder at the class list" else "classes.gpkg")
    classes.write_text("water\ntree\n")
    if case == "polygons over the class list":
        out = classes
    elif case == "model in the rasters folder":
        model = tmp_path / "c_rasters" / "tiny.safetensors"
        model.parent.mkdir()
        shutil.copyfile(tiny_model, model)
    before = tree(tmp_path)
    result = CliRunner().invoke(app, ["segment", str(raster), "--classes-file", str(classes), "--model", str(model),
                                      "--out", str(out), "--class-raster", str(tmp_path / "c.vrt"),
                                      "--workers", "1", "--quiet", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert words.format(tmp=tmp_path) in " ".join(result.output.split())
    assert tree(tmp_path) == before


def test_the_scale_request_of_the_server_protects_the_same_files(tiny_model, tmp_path):
    from backend.engine.checks import input_files
    from backend.engine.options import SegmentOptions
    from backend.scale.run import ScaleRequest

    classes = tmp_path / "classes.txt"
    classes.write_text("water\n")
    options = SegmentOptions(raster=str(tmp_path / "a.tif"), classes_file=classes, model=str(tiny_model))
    request = ScaleRequest.from_options(options)
    assert request.inputs == {"model": Path(tiny_model), "class list": classes}
    assert request.inputs.items() <= input_files(options).items()


def write_zip(path: Path, member: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, "sub/scene.tif")
    return path


def test_the_resume_facts_are_the_files_read_when_planning(tiny_model, tmp_path, monkeypatch):
    """Each planned raster's files are recorded as a fresh look-up would find them (a VRT mosaic's sources and
    their overviews, a zipped GeoTIFF's archive, a GeoPackage's table), without opening it again; only a raster
    that could not be planned is looked up."""
    import rasterio

    from backend.engine import feature_cache
    from backend.scale import run
    from backend.scale.manifest import Manifest

    one, two = write_image(tmp_path / "t1.tif", 500000, 1), write_image(tmp_path / "t2.tif", 500096, 2)
    (tmp_path / "t2.tif.ovr").write_bytes(b"pyramids")
    mosaic = tmp_path / "mosaic.vrt"
    write_raster_vrt(mosaic, [one, two], CRS.from_epsg(32632))
    with rasterio.open(one) as source:
        grid = {key: source.profile[key] for key in ("width", "height", "count", "dtype", "crs", "transform")}
        with rasterio.open(tmp_path / "tables.gpkg", "w", driver="GPKG", RASTER_TABLE="t1", **grid) as table:
            table.write(source.read())
    zipped = f"/vsizip/{write_zip(tmp_path / 'scene.zip', two)}/sub/scene.tif"
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a raster")
    paths = [str(one), str(mosaic), f"GPKG:{tmp_path / 'tables.gpkg'}:t1", zipped, str(bad)]

    looked_up: list[str] = []

    def reads(path, dataset=None):
        if dataset is None:
            looked_up.append(str(path))
        return feature_cache.raster_reads(path, dataset)

    recorded: dict = {}
    real_open = Manifest.open

    def manifest_open(out, facts, restart):
        recorded.update(facts)
        return real_open(out, facts, restart)

    monkeypatch.setattr(run, "raster_reads", reads)
    monkeypatch.setattr(run.Manifest, "open", manifest_open)
    monkeypatch.setattr(run, "Workers", no_workers)
    result = CliRunner().invoke(app, ["segment", *paths, "-c", "water", "--model", str(tiny_model),
                                      "--out", str(tmp_path / "h.gpkg"), "--workers", "1", "--quiet"])
    assert isinstance(result.exception, AssertionError), result.output  # stopped where the workers start
    assert looked_up == [str(bad)]
    monkeypatch.undo()
    assert recorded["inputs"] == run._input_facts(paths)
    assert [entry["path"] for entry in recorded["inputs"]] == [
        str(one), str(mosaic), str(tmp_path / "tables.gpkg"), str(tmp_path / "scene.zip"), str(bad)]
    assert {read["file"] for read in recorded["inputs"][1]["reads"]} >= {str(one), str(two), f"{two}.ovr"}
