"""Every careless or hostile `farslip segment` call of issue 17, as a table.

Each row: the arguments, the exit code, a phrase of the one-line message. For every row the test
also checks that nothing else was printed (no traceback, no library warning, no GDAL/PROJ line
written straight to the terminal), that the output folder holds exactly what it held before, and
that every input file is byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.control import GroundControlPoint
from rasterio.rpc import RPC
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine.quality import QualityModel
from backend.service.cli import app

# 300 x 300 pixels of the NAIP image (EPSG:26914), as in the server tests.
BBOX = ["486500", "5206500", "488000", "5208000"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _write(path: Path, data: np.ndarray, **profile) -> Path:
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": data.dtype, **profile}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, naip) -> Path:
    """The input files of the table, in one folder that no case may change."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(naip, folder / "in.tif")
    (folder / "sub").mkdir()
    (folder / "link.tif").symlink_to(folder / "in.tif")
    with rasterio.open(folder / "in.tif") as src:  # a VRT mosaic of in.tif, as gdalbuildvrt writes one
        bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">'
                        f"in.tif</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
                        for b in range(1, src.count + 1))
        (folder / "mosaic.vrt").write_text(
            f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}"><SRS>{src.crs.to_wkt()}</SRS>'
            f"<GeoTransform>{', '.join(map(str, src.transform.to_gdal()))}</GeoTransform>{bands}</VRTDataset>")
        (folder / "outer.vrt").write_text((folder / "mosaic.vrt").read_text().replace(">in.tif<", ">mosaic.vrt<"))
    save_plain(make_tiny_clip(), folder / "tiny.pt")
    model = make_tiny_clip()
    with torch.no_grad():
        model.visual.conv1.weight[0, 0, 0, 0] = float("nan")
    save_plain(model, folder / "nan-weights.pt")
    torch.save({"state_dict": make_tiny_clip().state_dict(), "hook": _RunsCode()}, folder / "evil.pt")
    (folder / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    QualityModel().save(folder / "calibration.geojson")  # the built-in estimate's coefficients, as a file
    (folder / "classes-nul.txt").write_text("water\nroad\x00way\n", encoding="utf-8")
    (folder / "classes-huge.txt").write_text("w" * (2 * 2**20), encoding="utf-8")  # one line, no newline
    (folder / "classes-long.txt").write_text("water\n" + "w" * 5000 + "\n", encoding="utf-8")
    (folder / "classes-invisible.txt").write_text("water\n\u200b\n", encoding="utf-8")
    os.mkfifo(folder / "fifo.tif")
    os.mkfifo(folder / "fifo.txt")
    os.mkfifo(folder / "fifo.pt")
    transform = from_origin(500000, 5200000, 5, 5)
    _write(folder / "complex.tif", np.ones((1, 64, 64), np.complex64), crs="EPSG:32614", transform=transform)
    # Sentinel-1 SLC's CInt16, which numpy has no type for.
    with rasterio.open(folder / "cint16.tif", "w", driver="GTiff", height=64, width=64, count=1, dtype="complex_int16",
                       crs="EPSG:32614", transform=transform):
        pass
    with rasterio.open(folder / "photo.jpg", "w", driver="JPEG", height=64, width=64, count=3,
                       dtype="uint8") as dst:
        dst.write(np.full((3, 64, 64), 100, np.uint8))
    os.replace(folder / "photo.jpg", folder / "photo.tif")
    for sidecar in folder.glob("photo.jpg.*"):
        sidecar.unlink()
    gcps = [GroundControlPoint(0, 0, 500000, 5200000), GroundControlPoint(0, 64, 500320, 5200000),
            GroundControlPoint(64, 0, 500000, 5199680)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a raster without a geotransform is the point here
        _write(folder / "gcps.tif", np.full((3, 64, 64), 100, np.uint8), gcps=gcps,
               crs=rasterio.crs.CRS.from_epsg(32614))
        rpcs = RPC(height_off=0, height_scale=500, lat_off=45.0, lat_scale=0.01, line_den_coeff=[1] + [0] * 19,
                   line_num_coeff=[0, 0, -1] + [0] * 17, line_off=32, line_scale=32, long_off=9.0, long_scale=0.01,
                   samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18, samp_off=32, samp_scale=32)
        _write(folder / "rpcs.tif", np.full((3, 64, 64), 100, np.uint8), rpcs=rpcs)
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink() and not p.name.startswith("fifo")}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# (case, arguments after `segment`, exit code, phrase of the message). {in} is the inputs folder,
# {out} the output folder (which holds an existing folder `d.gpkg` with a file in it).
CASES = [
    ("polygons over the quality calibration read",
     "{in}/in.tif -c water -c road --model {in}/tiny.pt --out {in}/calibration.geojson --quality-calibration "
     "{in}/calibration.geojson --overwrite", 2, "is the quality calibration"),
    ("GeoParquet from one raster in this process", "{in}/in.tif -c water --out {out}/r.parquet", 2,
     "GeoParquet is written by runs on Ray; add --workers 1"),
    # an output that would destroy an input or a folder
    ("class raster is the input", "{in}/in.tif -c water --class-raster {in}/in.tif --overwrite", 2,
     "would destroy the input"),
    ("class raster is the input through a symlink", "{in}/in.tif -c water --class-raster {in}/link.tif --overwrite",
     2, "would destroy the input"),
    ("class raster is the input through ..", "{in}/in.tif -c water --class-raster {in}/sub/../in.tif --overwrite",
     2, "would destroy the input"),
    ("output in a folder whose name is too long", f"{{in}}/in.tif -c water --out {{out}}/{'c' * 300}/x.gpkg", 2,
     "holds a name of 300 bytes (cccc"),
    ("class raster path too long in all", f"{{in}}/in.tif -c water --class-raster {{out}}/{'d/' * 2100}c.tif", 2,
     "bytes long, more than the 4095 a path may have"),
    ("class raster is a source of the input VRT", "{in}/mosaic.vrt -c water --class-raster {in}/in.tif --overwrite",
     2, "is a file that the input raster mosaic.vrt reads (a source of a VRT"),
    ("class raster is a source of a VRT the input VRT reads", "{in}/outer.vrt -c water --class-raster {in}/in.tif "
     "--overwrite", 2, "is a file that the input raster outer.vrt reads (a source of a VRT"),
    ("probability raster is a source of the input VRT, on workers", "{in}/mosaic.vrt -c water --prob-raster "
     "{in}/in.tif --workers 1 --overwrite", 2, "is a file that the input raster mosaic.vrt reads (a source of a VRT"),
    ("input given through a symlink, output the real file", "{in}/link.tif -c water --class-raster {in}/in.tif "
     "--overwrite", 2, "would destroy the input"),
    ("probability raster is the class raster", "{in}/in.tif -c water --class-raster {out}/c.tif --prob-raster "
     "{out}/./c.tif", 2, "same file"),
    ("output is an existing folder, overwrite", "{in}/in.tif -c water --out {out}/d.gpkg --overwrite", 2,
     "is a folder"),
    # a folder that refuses files: named as such, never as "not enough space" or a temporary file's name
    ("output in /proc", "{in}/in.tif -c water --out /proc/r.gpkg", 2, "output folder /proc is a system folder"),
    ("output in /sys", "{in}/in.tif -c water --out /sys/r.gpkg", 2, "output folder /sys is a system folder"),
    ("tab in the output name", ["{in}/in.tif", "-c", "water", "--out", "{out}/a\tb.gpkg"], 2, "control character"),
    ("newline in the class raster name", ["{in}/in.tif", "-c", "water", "--class-raster", "{out}/a\nb.tif"], 2,
     "control character"),
    ("output name longer than the disk holds", ["{in}/in.tif", "-c", "water", "--out", "{out}/" + "n" * 300 + ".gpkg"],
     2, "is too long"),
    ("output name whose temporary copy would not fit", ["{in}/in.tif", "-c", "water", "--out",
                                                         "{out}/" + "n" * 200 + ".gpkg"], 2, "is too long"),
    ("class raster in /proc", "{in}/in.tif -c water --class-raster /proc/c.tif --out {out}/r.gpkg", 2,
     "output folder /proc is a system folder"),
    # files that are not regular files, paths that cannot be expanded
    ("raster is a FIFO", "{in}/fifo.tif -c water", 2, "named pipe"),
    ("class file is a FIFO", "{in}/in.tif --classes-file {in}/fifo.txt", 2, "named pipe"),
    ("model is a FIFO", "{in}/in.tif -c water --model {in}/fifo.pt", 3, "named pipe"),
    ("model of an unknown user's home", "{in}/in.tif -c water --model ~nosuchuser/m.pt", 3, "no such user"),
    ("registry model with a folder that is no model as weights", "{in}/in.tif -c water --model clip-vit-b-16 "
     "--weights {in}/sub", 3, "is a folder but neither a weights file nor a fine-tuned model"),
    ("empty model name (an unset shell variable)", ["{in}/in.tif", "-c", "water", "--model", ""], 3,
     "--model is empty: leave it out to use the default model"),
    ("blank weights path", ["{in}/in.tif", "-c", "water", "--weights", " "], 3, "--weights is empty"),
    ("weights of an unknown user's home", "{in}/in.tif -c water --model farslip2-vit-b-16 "
     "--weights ~nosuchuser/w.pt", 3, "no such user"),
    # rasters and checkpoints that used to end in a traceback or a library's words
    ("complex64 raster", "{in}/complex.tif -c water", 2, "complex numbers"),
    ("complex 16-bit integer raster (SLC)", "{in}/cint16.tif -c water", 2, "holds complex numbers (complex_int16)"),
    ("JPEG renamed .tif", "{in}/photo.tif -c water", 2, "no coordinate reference system"),
    ("raster georeferenced by GCPs only", "{in}/gcps.tif -c water", 2, "ground control points"),
    ("satellite scene with RPCs only", "{in}/rpcs.tif -c water", 2, "gdalwarp -rpc"),
    ("damaged pixel blocks", "{data}/corrupt.tif -c water", 2, "damaged or truncated"),
    ("checkpoint with NaN weights", "{in}/in.tif -c water --model {in}/nan-weights.pt", 3, "NaN or infinite"),
    ("pickle that runs code", "{in}/in.tif -c water --model {in}/evil.pt", 3, "Refusing to load"),
    ("random bytes as checkpoint", "{in}/in.tif -c water --model {in}/random.pt", 3, "not a readable PyTorch"),
    ("unknown bbox CRS", "{in}/in.tif -c water --bbox 0 0 1 1 --bbox-crs EPSG:99999", 2, "not a CRS I know"),
    ("unknown device", "{in}/in.tif -c water --device bogus", 2, "Unknown device"),
    # options of a run on Ray, which a run of one raster in this process ignored without a word
    ("--out-crs on one raster", "{in}/in.tif -c water --out-crs EPSG:4326", 2, "--out-crs applies to runs on Ray"),
    ("--restart on one raster", "{in}/in.tif -c water --restart", 2, "--restart applies to runs on Ray"),
    ("--workers 0", "{in}/in.tif -c water --workers 0", 2, "--workers must be at least 1"),
    ("blank class line (an unset shell variable)", ["{in}/in.tif", "-c", "", "-c", "water"], 2,
     "Class line 1 of 2 given one by one is blank"),
    ("more local workers than cores", "{in}/in.tif -c water --workers 100000", 2,
     "--workers 100000 is more than the"),
    # numbers that are not finite or out of range
    ("--gsd nan", "{in}/in.tif -c water --gsd nan", 2, "--gsd"),
    ("--gsd inf", "{in}/in.tif -c water --gsd inf", 2, "--gsd"),
    ("--scale nan", "{in}/in.tif -c water --scale nan", 2, "--scale"),
    ("--simplify nan", "{in}/in.tif -c water --simplify nan", 2, "--simplify"),
    ("--min-area nan", "{in}/in.tif -c water --min-area nan", 2, "--min-area"),
    ("--threshold nan", "{in}/in.tif -c water --threshold nan", 2, "threshold"),
    ("--batch-size 0", "{in}/in.tif -c water --batch-size 0", 2, "batch size"),
    ("--value-range nan nan", "{in}/in.tif -c water --value-range nan nan", 2, "--value-range"),
    ("--value-range min > max", "{in}/in.tif -c water --value-range 10000 100", 2, "--value-range"),
    ("bbox latitude beyond 90", "{in}/in.tif -c water --bbox -97 47 -96 100 --bbox-crs EPSG:4326", 2,
     "latitudes"),
    ("bbox latitude below -90", "{in}/in.tif -c water --bbox -97 -100 -96 47 --bbox-crs EPSG:4326", 2,
     "latitudes"),
    # class names that the outputs cannot hold faithfully
    ("newline inside a class name", ["{in}/in.tif", "-c", "water\nlake"], 2, "control character"),
    ("NUL inside a class file line", "{in}/in.tif --classes-file {in}/classes-nul.txt", 2, "control character"),
    ("300-character class name into a shapefile", ["{in}/in.tif", "-c", "w" * 300, "--out", "{out}/r.shp"],
     2, "shapefile holds at most"),
    # class lists larger than a run can use: refused as they are read, before the model loads (a 50 MB class
    # file was sent to the text encoder whole; a class line of 5000 characters passed on the command line)
    ("class file larger than any class list", "{in}/in.tif --classes-file {in}/classes-huge.txt", 2,
     "classes-huge.txt is larger than 1 MiB"),
    ("5000-character line in a class file", "{in}/in.tif --classes-file {in}/classes-long.txt", 2,
     "classes-long.txt) is 5000 characters long; give at most 1000 characters"),
    ("5000-character class name", ["{in}/in.tif", "-c", "w" * 5000], 2, "is 5000 characters long"),
    ("class file line of a zero-width space", "{in}/in.tif --classes-file {in}/classes-invisible.txt", 2,
     "(line 2 of the class file"),
    ("class name of a zero-width space", ["{in}/in.tif", "-c", "water", "-c", "\u200b"], 2,
     "holds only invisible characters (U+200B ZERO WIDTH SPACE)"),
]


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "d.gpkg").mkdir()
    (folder / "d.gpkg" / "keep.txt").write_text("the user's file")
    return folder


@pytest.mark.parametrize("case, args, code, phrase", CASES, ids=[case[0] for case in CASES])
def test_segment_refuses_with_one_line_and_touches_nothing(case, args, code, phrase, inputs, out_dir, tmp_path,
                                                           capfd, shared_data, monkeypatch):
    monkeypatch.chdir(out_dir)  # the default --out (result.gpkg) lands in the watched folder too
    words = args.split() if isinstance(args, str) else list(args)
    words = [w.format(**{"in": inputs, "out": out_dir, "data": shared_data}) for w in words]
    if "--device" not in words:
        words += ["--device", "cpu"]
    if "--model" not in words:
        words += ["--model", str(inputs / "tiny.pt")]
    if "--bbox" not in words and "in.tif" in words[0]:
        words += ["--bbox", *BBOX]
    before_inputs, before_out = _hashes(inputs), _tree(out_dir)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["segment", *words, "--quiet"])
    printed_by_libraries = capfd.readouterr()

    lines = result.output.strip().splitlines()
    assert result.exit_code == code, (case, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and phrase in lines[0], result.output
    assert [str(w.message) for w in caught] == []
    assert printed_by_libraries.err == "" and printed_by_libraries.out == ""
    assert _tree(out_dir) == before_out
    assert (out_dir / "d.gpkg" / "keep.txt").read_text() == "the user's file"
    assert _hashes(inputs) == before_inputs


def test_infinite_pixels_are_masked_like_nan(tmp_path, inputs):
    """+-inf in a float raster gets no class, as NaN does (before: classified as if bright)."""
    data = np.linspace(0, 1, 3 * 224 * 224, dtype=np.float32).reshape(3, 224, 224)
    data[:, :10, :] = np.inf
    data[:, 10:20, :] = -np.inf
    data[:, 20:30, :] = np.nan
    raster = _write(tmp_path / "float.tif", data, crs="EPSG:32614", transform=from_origin(500000, 5200000, 5, 5))
    result = CliRunner().invoke(app, ["segment", str(raster), "-c", "water", "-c", "field", "--model",
                                      str(inputs / "tiny.pt"), "--device", "cpu", "--quiet",
                                      "--out", str(tmp_path / "r.gpkg"), "--class-raster", str(tmp_path / "c.tif")])
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "c.tif") as classes:
        ids = classes.read(1)
        nodata = classes.nodata
    assert (ids[:30] == nodata).all()
    assert (ids[30:] != nodata).all()


def test_the_progress_line_never_says_nan(tmp_path, inputs):
    result = CliRunner().invoke(app, ["segment", str(inputs / "in.tif"), "-c", "water", "--model",
                                      str(inputs / "tiny.pt"), "--device", "cpu", "--bbox", *BBOX,
                                      "--out", str(tmp_path / "r.gpkg")])
    assert result.exit_code == 0, result.output
    assert "tiles" in result.output and "nan" not in result.output.lower()


def test_a_pickle_refusal_runs_no_code(tmp_path, inputs):
    marker = tmp_path / "ran"

    class Marks:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as stream:
        pickle.dump({"hook": Marks()}, stream)
    result = CliRunner().invoke(app, ["segment", str(inputs / "in.tif"), "-c", "water", "--model",
                                      str(tmp_path / "evil.pt"), "--device", "cpu", "--bbox", *BBOX,
                                      "--out", str(tmp_path / "r.gpkg")])
    assert result.exit_code == 3 and "Refusing" in result.output
    assert not marker.exists()


# `farslip train`: the output folder is never a folder the user made, nor one holding the inputs.
TRAIN_CASES = [
    ("overwrite a folder train did not write", "{in}/in.tif {in}/labels.geojson --out {out}/d.gpkg --overwrite", 2,
     "did not write"),
    ("out is the folder holding the raster", "{in}/in.tif {in}/labels.geojson --out {in} --overwrite", 2,
     "lies inside"),
    ("out is an existing file", "{in}/in.tif {in}/labels.geojson --out {in}/random.pt --overwrite", 2,
     "not a model folder"),
    ("labels are a FIFO", "{in}/in.tif {in}/fifo.txt --out {out}/model", 2, "named pipe"),
    # options and report files checked before the model loads
    ("negative steps per epoch", "{in}/in.tif {in}/labels.geojson --out {out}/model --steps-per-epoch -3", 2,
     "--steps-per-epoch must be at least 1"),
    ("negative seed", "{in}/in.tif {in}/labels.geojson --out {out}/model --seed -1", 2,
     "--seed must be a whole number from 0"),
    ("infinite patch loss weight", "{in}/in.tif {in}/labels.geojson --out {out}/model --patch-loss-weight inf", 2,
     "--patch-loss-weight must be a finite number ≥ 0"),
    ("json report in a missing folder", "{in}/in.tif {in}/labels.geojson --out {out}/model --json {out}/no/r.json",
     2, "does not exist"),
    ("json report is the raster", "{in}/in.tif {in}/labels.geojson --out {out}/model --json {in}/in.tif "
     "--overwrite", 2, "would destroy the input"),
    ("json report exists", "{in}/in.tif {in}/labels.geojson --out {out}/model --json {out}/d.gpkg/keep.txt", 2,
     "already exists"),
]


@pytest.mark.parametrize("case, args, code, phrase", TRAIN_CASES, ids=[case[0] for case in TRAIN_CASES])
def test_train_refuses_with_one_line_and_touches_nothing(case, args, code, phrase, inputs, out_dir, shared_data):
    _refuses_and_touches_nothing(["train", *_words(args, inputs, out_dir), "--class-field", "building",
                                  "--base-model", str(inputs / "tiny.pt")], code, phrase, inputs, out_dir, shared_data)


def _words(args: str, inputs: Path, out_dir: Path) -> list[str]:
    return [w.format(**{"in": inputs, "out": out_dir}) for w in args.split()]


def _refuses_and_touches_nothing(command: list[str], code: int, phrase: str, inputs: Path, out_dir: Path,
                                 shared_data: Path) -> None:
    """Run a training command on the labelled sample: one `Error:` line with `phrase`, exit `code`, and
    neither the inputs nor the output folder changed."""
    shutil.copy(shared_data / "solaris_geotiff_labels.geojson", inputs / "labels.geojson")
    before_inputs, before_out = _hashes(inputs), _tree(out_dir)
    result = CliRunner().invoke(app, [*command, "--device", "cpu", "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, (command, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and phrase in lines[0], result.output
    assert _tree(out_dir) == before_out and _hashes(inputs) == before_inputs


# `farslip evaluate`: unknown options and report files it cannot write are refused before the model loads.
EVALUATE_CASES = [
    ("unknown attention variant", "--attention foo", 2, "--attention must be one of segearth"),
    ("json report in a missing folder", "--json {out}/no/m.json", 2, "does not exist"),
    ("png report in a missing folder", "--json {out}/m.json --png {out}/no/m.png", 2, "does not exist"),
    ("png report of another format", "--png {out}/m.jpg", 2, "must end in .png"),
    ("json and png reports are one file", "--json {out}/m --png {out}/m", 2, "are the same file"),
    ("json report is the labels", "--json {in}/labels.geojson --overwrite", 2, "would destroy the input"),
    ("json report exists", "--json {out}/d.gpkg/keep.txt", 2, "allow overwriting (--overwrite)"),
    ("json report is a folder", "--json {out}/d.gpkg --overwrite", 2, "is a folder"),
    ("quality calibration in a missing folder", "--calibrate-quality --quality-out {out}/no/q.json", 2,
     "does not exist"),
    ("json report in a folder whose name is too long", f"--json {{out}}/{'c' * 300}/m.json", 2,
     "holds a name of 300 bytes"),
]


@pytest.mark.parametrize("case, args, code, phrase", EVALUATE_CASES, ids=[case[0] for case in EVALUATE_CASES])
def test_evaluate_refuses_with_one_line_and_touches_nothing(case, args, code, phrase, inputs, out_dir, shared_data):
    _refuses_and_touches_nothing(["evaluate", str(inputs / "in.tif"), str(inputs / "labels.geojson"),
                                  "--class-field", "building", "--background", "ground", "--model",
                                  str(inputs / "tiny.pt"), *_words(args, inputs, out_dir)], code, phrase, inputs,
                                 out_dir, shared_data)


@pytest.mark.parametrize("what", ["raster", "model", "search raster"])
def test_an_input_path_too_long_for_the_file_system_is_one_sentence_from_the_command(what, inputs, tmp_path):
    """Whichever check meets such a path first (the raster's kind, the model's place), the command says it in
    one sentence with exit 2, as for an output, instead of Python's OSError traceback."""
    long_name = str(tmp_path / ("c" * 300 + ".tif"))
    args = {"raster": ["segment", long_name, "-c", "water", "--model", inputs / "tiny.pt"],
            "model": ["segment", inputs / "in.tif", "-c", "water", "--model", tmp_path / ("m" * 300 + ".pt")],
            "search raster": ["search", long_name, "a lake", "--model", inputs / "tiny.pt"]}[what]
    done = subprocess.run([str(Path(sys.executable).parent / "farslip"), *map(str, args), "--out",
                           str(tmp_path / "x.gpkg")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("Error: The ") and (
        "too long" in done.stderr.lower()), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.gpkg").exists()
