"""`farslip index/search/classify/evaluate-retrieval` as a user runs them: outputs that would destroy
an input or cannot be files, options checked before the model loads, Ctrl+C and SIGTERM."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.service.cli import app

MODEL_ARGS = ["--device", "cpu", "-q"]


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def crop(shared_data, tmp_path) -> Path:
    """300 x 300 px of the NAIP raster (EPSG:26914, 5 m) as a GeoTIFF."""
    with rasterio.open(shared_data / "naip_2020_5m.tif") as src:
        window = rasterio.windows.Window(100, 100, 300, 300)
        profile = {"driver": "GTiff", "width": 300, "height": 300, "count": 3, "dtype": "uint8", "crs": src.crs,
                   "transform": src.window_transform(window)}
        data = src.read([1, 2, 3], window=window)
    path = tmp_path / "crop.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def gpkg_raster(crop, tmp_path) -> Path:
    """The same pixels as a GeoPackage raster: a .gpkg, as the vector outputs are."""
    path = tmp_path / "raster.gpkg"
    with rasterio.open(crop) as src:
        with rasterio.open(path, "w", driver="GPKG", width=src.width, height=src.height, count=3, dtype="uint8",
                           crs=src.crs, transform=src.transform) as dst:
            dst.write(src.read())
    return path


def rsicd(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"s{i}.png")
        entries.append({"filename": f"s{i}.png", "split": "test", "sentences": [{"raw": f"scene {i}"}]})
    (folder / "dataset_rsicd.json").write_text(json.dumps({"images": entries}))
    return folder


def test_search_and_classify_never_write_over_the_input_raster(gpkg_raster, tiny_model):
    before = sha(gpkg_raster)
    for command in (["search", gpkg_raster, "a road"], ["classify", gpkg_raster, "-c", "water", "-c", "road"]):
        result = run(*command, "--model", tiny_model, *MODEL_ARGS, "-o", gpkg_raster, "--overwrite")
        assert result.exit_code == 2, result.output
        assert "is the input raster" in result.output and "would destroy the input" in result.output
    assert sha(gpkg_raster) == before
    with rasterio.open(gpkg_raster) as src:
        assert src.shape == (300, 300)


def test_outputs_that_are_folders_are_refused_before_any_work(crop, tiny_model, tmp_path):
    folder = tmp_path / "hits.gpkg"
    folder.mkdir()
    for command in (["search", crop, "a road", "-o", folder], ["classify", crop, "-c", "a", "-c", "b", "-o", folder]):
        result = run(*command, "--model", tiny_model, *MODEL_ARGS, "--overwrite")
        assert result.exit_code == 2, result.output
        assert f"The output {folder} is a folder" in result.output
    data = rsicd(tmp_path / "rsicd")
    result = run("evaluate-retrieval", data, "--model", tiny_model, *MODEL_ARGS, "--json", folder)
    assert result.exit_code == 2 and f"The --json file {folder} is a folder" in result.output
    assert list(folder.iterdir()) == []


def test_evaluate_retrieval_checks_json_and_batch_size_before_the_model(tmp_path):
    data = rsicd(tmp_path / "rsicd")
    missing_model = str(tmp_path / "no-such-model.safetensors")  # these checks come first, so it is not read
    result = run("evaluate-retrieval", data, "--model", missing_model, *MODEL_ARGS, "--json",
                 tmp_path / "nowhere" / "r.json")
    assert result.exit_code == 2, result.output
    assert f"The output folder {tmp_path / 'nowhere'} does not exist" in result.output
    result = run("evaluate-retrieval", data, "--model", missing_model, *MODEL_ARGS, "--json",
                 data / "dataset_rsicd.json")
    assert result.exit_code == 2 and "would destroy the input" in result.output
    for size in ("0", "-1"):
        result = run("evaluate-retrieval", data, "--model", missing_model, *MODEL_ARGS, "--batch-size", size)
        assert result.exit_code == 2, result.output
        assert f"The batch size must be a whole number from 1 to 1024; got {size}." in result.output
    assert json.loads((data / "dataset_rsicd.json").read_text())["images"][0]["filename"] == "s0.png"


def test_evaluate_retrieval_keeps_an_existing_json_file_unless_told_to_replace_it(tmp_path, tiny_model):
    data = rsicd(tmp_path / "rsicd")
    figures = tmp_path / "recalls.json"
    figures.write_text("last month's figures")
    result = run("evaluate-retrieval", data, "--model", tiny_model, *MODEL_ARGS, "--json", figures, "-q")
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert figures.read_text() == "last month's figures"
    result = run("evaluate-retrieval", data, "--model", tiny_model, *MODEL_ARGS, "--json", figures, "-q",
                 "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(figures.read_text())["images"] == 3


def test_evaluate_retrieval_never_writes_its_json_over_an_image_of_the_dataset(tmp_path, tiny_model):
    """--overwrite replaces an earlier figures file, never an image the caption JSON names (of any split)."""
    data = rsicd(tmp_path / "rsicd")
    captions = json.loads((data / "dataset_rsicd.json").read_text())
    captions["images"][2]["split"] = "train"
    (data / "dataset_rsicd.json").write_text(json.dumps(captions))
    for image in ("s0.png", "s2.png"):
        before = sha(data / "images" / image)
        result = run("evaluate-retrieval", data, "--model", tiny_model, *MODEL_ARGS, "--json", data / "images" / image,
                     "--overwrite")
        assert result.exit_code == 2 and "would destroy the input" in result.output, result.output
        assert sha(data / "images" / image) == before


def test_evaluate_retrieval_refuses_a_16_bit_image_and_reads_a_caption_json_with_a_bom(tmp_path, tiny_model):
    data = rsicd(tmp_path / "rsicd")
    (data / "dataset_rsicd.json").write_bytes(b"\xef\xbb\xbf" + (data / "dataset_rsicd.json").read_bytes())
    result = run("evaluate-retrieval", data, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    wide = np.random.default_rng(1).integers(0, 60000, (64, 64), dtype=np.uint16)
    Image.fromarray(wide).save(data / "images" / "s1.png")  # 16-bit grey: convert("RGB") made it white
    result = run("evaluate-retrieval", data, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 2, result.output
    assert f"The image {data / 'images' / 's1.png'} is not 8-bit (PIL mode I;16)" in " ".join(result.output.split())


def test_index_refuses_a_batch_size_below_one(crop, tiny_model):
    for size in ("0", "-5"):
        result = run("index", crop, "--model", tiny_model, *MODEL_ARGS, "--batch-size", size)
        assert result.exit_code == 2, result.output
        assert f"The batch size must be a whole number from 1 to 1024; got {size}." in result.output


def test_shapefile_outputs_refuse_text_they_would_cut(crop, tiny_model, tmp_path):
    long_text = ("a very long description of a place " * 8).strip()  # 279 bytes
    result = run("search", crop, long_text, "--model", tiny_model, *MODEL_ARGS, "-o", tmp_path / "hits.shp")
    assert result.exit_code == 2, result.output
    assert "is 279 bytes long; a shapefile's query field holds at most 254" in result.output
    result = run("classify", crop, "-c", long_text, "-c", "road", "--model", tiny_model, *MODEL_ARGS,
                 "-o", tmp_path / "tiles.shp")
    assert result.exit_code == 2, result.output
    assert "is 279 bytes long; a shapefile holds at most 254" in result.output
    assert "RuntimeWarning" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.tif"]


def test_search_refuses_a_sentence_given_twice(crop, tiny_model, tmp_path):
    result = run("search", crop, "a road", "a road", "--model", tiny_model, *MODEL_ARGS, "-o", tmp_path / "h.gpkg")
    assert result.exit_code == 2 and "'a road' was given twice" in result.output
    assert not (tmp_path / "h.gpkg").exists()


# Text no model should read, refused with the sentence a class line gets, before the model loads.
UNREADABLE_TEXT = [
    (["search", "{crop}", "a\x00lake"], "The search sentence 'a\\x00lake' contains the control character '\\x00' "
                                       "(NUL); type it as plain text on one line."),
    (["search", "{crop}", "\u200b"], "The search sentence '\\u200b' holds only invisible characters (U+200B ZERO "
                                     "WIDTH SPACE); type visible text, or leave it out."),
    (["search", "{crop}", "a lake", "\ufeff\u200e"], "holds only invisible characters (U+FEFF ZERO WIDTH NO-BREAK "
                                                     "SPACE)"),
    (["search", "{crop}", "a" * 2001], "is 2001 characters long; give at most 2000 characters."),
    (["search", "{crop}", "a lake", "--keywords", "lake; \u00ad"], "The keyword '\\xad' of --keywords 'lake; "
                                                                 "\\xad' holds only invisible characters"),
    (["search", "{crop}", "a lake", "--like-crs", "EPSG:4326"], "--like-crs EPSG:4326 says which CRS the --like "
     "point is in, and no --like was given; add --like X Y, or leave --like-crs out."),
    (["classify", "{crop}", "-c", "water", "-c", "w" * 1001], "is 1001 characters long; give at most 1000"),
    (["classify", "{crop}", "-c", "water", "-c", "\u00ad"], "holds only invisible characters (U+00AD SOFT HYPHEN)"),
    (["classify", "{crop}", "--classes-file", "{huge}"], "huge.txt is larger than 1 MiB"),
]


@pytest.mark.parametrize("args, words", UNREADABLE_TEXT, ids=[str(i) for i in range(len(UNREADABLE_TEXT))])
def test_search_and_classify_refuse_text_no_model_could_read_before_the_model_loads(crop, tmp_path, args, words):
    """A NUL or only invisible characters in a sentence, a --like-crs without --like, over-long or invisible class
    lines and a class file of megabytes: each was run (or sent to the text encoder) instead of refused."""
    huge = tmp_path / "huge.txt"
    huge.write_text("w" * (2 * 2**20), encoding="utf-8")
    missing_model = tmp_path / "no-such-model.safetensors"  # these checks come first, so it is not looked for
    out = tmp_path / "out.gpkg"
    result = run(*[a.format(crop=crop, huge=huge) for a in args], "--model", missing_model, *MODEL_ARGS, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert words in result.output
    assert not out.exists()


# Runs the CLI in its own process with one function replaced by a signal sent to itself, mid-run.
SIGNAL_MID_RUN = """
import os, signal, sys
import backend.engine.classify as classify
import backend.engine.search_index as search_index
signum = int(sys.argv[1])
original_write = search_index.SearchIndex._write_row
def write_then_stop(self, *args):
    original_write(self, *args)  # one grid row is on disk, then the signal
    os.kill(os.getpid(), signum)
def stop(*args, **kwargs):
    os.kill(os.getpid(), signum)
    raise SystemExit("the signal did not stop the run")
search_index.SearchIndex._write_row = write_then_stop
classify.embed_windows = stop
from backend.service.cli import app
app(sys.argv[2:], prog_name="farslip")
"""


def cli_with_signal(signum: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_MID_RUN, str(signum), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["Ctrl+C", "SIGTERM"])
def test_an_interrupted_index_says_its_windows_are_kept_and_the_next_run_continues(crop, tiny_model, signum, code):
    done = cli_with_signal(signum, "index", crop, "--model", tiny_model, *MODEL_ARGS)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == [
        "Interrupted; the windows indexed so far are kept, and the next index or search of this raster continues "
        "from them."]
    again = run("index", crop, "--model", tiny_model, "--device", "cpu")
    assert again.exit_code == 0, again.output
    reused = int(again.output.split(" reused")[0].rsplit(" ", 1)[1])
    assert reused >= 1  # the row written before the interruption


@pytest.mark.parametrize("command", ["search", "classify"])
def test_sigterm_stops_search_and_classify_with_a_sentence_and_nothing_written(crop, tiny_model, tmp_path, command):
    what = ["a road"] if command == "search" else ["-c", "water", "-c", "road"]
    out = tmp_path / "out.gpkg"
    done = cli_with_signal(signal.SIGTERM, command, crop, *what, "--model", tiny_model, *MODEL_ARGS, "-o", out)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Interrupted; ")
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.tif"]


def test_search_and_classify_keep_another_outputs_report_unless_told_to_replace_it(crop, tiny_model, tmp_path):
    """h.gpkg and h.shp share h.report.json: a second output beside the first is refused as segment's is."""
    first = run("search", crop, "a road", "--model", tiny_model, *MODEL_ARGS, "-o", tmp_path / "h.gpkg", "-q")
    assert first.exit_code == 0, first.output
    report = (tmp_path / "h.report.json").read_text()
    for command in (["search", crop, "a lake"], ["classify", crop, "-c", "water", "-c", "road"]):
        result = run(*command, "--model", tiny_model, *MODEL_ARGS, "-o", tmp_path / "h.shp", "-q")
        assert result.exit_code == 2, result.output
        assert f"The run report {tmp_path / 'h.report.json'} already exists" in result.output
        assert (tmp_path / "h.report.json").read_text() == report and not (tmp_path / "h.shp").exists()
    again = run("classify", crop, "-c", "water", "-c", "road", "--model", tiny_model, *MODEL_ARGS,
                "-o", tmp_path / "h.shp", "-q", "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "h.report.json").read_text())["outputs"]["vector"] == str(tmp_path / "h.shp")


def test_search_says_how_many_hits_it_did_not_list(shared_data, tiny_model, tmp_path):
    out = tmp_path / "many.gpkg"
    result = run("search", shared_data / "naip_2020_5m.tif", "a road", "a lake", "--top", "8", "--model", tiny_model,
                 "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    listed = [line for line in result.output.splitlines() if line.startswith("  ") and " m  " in line]
    total = int(result.output.split("Wrote ")[1].split(" hits")[0])
    assert total > 10 and len(listed) == 10
    assert f"  ... and {total - 10} more in {out}" in result.output


@pytest.fixture
def rotated(tmp_path) -> Path:
    """300 x 300 px of a checker pattern at 2 m (EPSG:32618) on a grid turned by 30 degrees: 4 windows."""
    yy, xx = np.mgrid[0:300, 0:300]
    data = np.stack([((xx // 30) % 2) * 200 + 20, ((yy // 30) % 2) * 180 + 30, (xx + yy) % 200]).astype(np.uint8)
    path = tmp_path / "rot.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8", crs="EPSG:32618",
                       transform=Affine(2, 0, 500000, 0, -2, 4100000) @ Affine.rotation(30)) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("suffix", [".gpkg", ".shp", ".geojson", ".fgb"])
def test_search_hits_on_a_rotated_raster_are_window_footprints_in_every_format(rotated, tiny_model, tmp_path, suffix):
    """`farslip index` then `farslip search`: each hit was its window's envelope, reaching off the raster."""
    with rasterio.open(rotated) as src:
        t = src.transform
    raster = shapely.Polygon([t @ c for c in ((0, 0), (300, 0), (300, 300), (0, 300))])
    windows = [shapely.Polygon([t @ (c + dc, r + dr) for dc, dr in ((0, 0), (224, 0), (224, 224), (0, 224))])
               for r in (0, 76) for c in (0, 76)]  # 224-px windows, the last shifted back to end at the edge
    assert run("index", rotated, "--model", tiny_model, *MODEL_ARGS).exit_code == 0
    out = tmp_path / f"hits{suffix}"
    result = run("search", rotated, "a lake", "--top", "10", "--max-overlap", "1", "--model", tiny_model,
                 *MODEL_ARGS, "-o", out)
    assert result.exit_code == 0, result.output
    _meta, _fids, geometry, fields = pyogrio.raw.read(out)
    hits = shapely.from_wkb(geometry)[np.argsort(fields[0])]  # by rank (FlatGeobuf's spatial index reorders)
    assert len(hits) == len(windows)
    for hit in hits:
        assert hit.difference(raster).area <= 1e-9 * hit.area
        assert sum(bool(shapely.equals_exact(shapely.normalize(hit), shapely.normalize(w), tolerance=1e-3))
                   for w in windows) == 1
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert all(shapely.Polygon(h["footprint"]).symmetric_difference(hits[i]).area < 1e-3
               for i, h in enumerate(report["hits"]))


def test_an_example_point_off_a_rotated_raster_is_refused_by_its_footprint(rotated, tiny_model, tmp_path):
    with rasterio.open(rotated) as src:
        corners = [src.transform @ c for c in ((0, 0), (300, 0), (300, 300), (0, 300))]
    left, top = min(x for x, _ in corners), max(y for _, y in corners)  # the envelope's corner: off the raster
    result = run("search", rotated, "--like", left + 5, top - 5, "--model", tiny_model, *MODEL_ARGS,
                 "-o", tmp_path / "like.gpkg")
    assert result.exit_code == 2, result.output
    assert "is outside the footprint of the raster rot.tif, whose grid is rotated: its corners are" in result.output
    assert "covers" not in result.output and not (tmp_path / "like.gpkg").exists()


def test_evaluate_retrieval_names_its_caption_file_and_warns_of_cut_captions(tmp_path, tiny_model):
    data = rsicd(tmp_path / "rsicd")
    document = json.loads((data / "dataset_rsicd.json").read_text())
    document["images"][1]["sentences"].append({"raw": "a very long caption about fields " * 40})
    (data / "dataset_rsicd.json").write_text(json.dumps(document))
    (data / "notes.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "s0.png"}]}))  # not captions
    result = CliRunner().invoke(app, ["evaluate-retrieval", str(data), "--model", str(tiny_model), "--device",
                                      "cpu"])
    assert result.exit_code == 0, result.output
    assert f"Captions from {data / 'dataset_rsicd.json'}" in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and "a very long caption" in warnings[0], result.output
    assert "tiles" not in result.output


@pytest.mark.parametrize("command", ["segment", "classify", "search"])
def test_a_bbox_inside_a_rotated_rasters_envelope_but_off_its_footprint_names_the_footprint(command, rotated,
                                                                                           tiny_model, tmp_path):
    """Every command says where the turned raster lies (its corners), not an envelope the box lies in."""
    with rasterio.open(rotated) as src:
        t = src.transform
    corners = np.array([t @ c for c in ((0, 0), (300, 0), (300, 300), (0, 300))])
    left, top = corners[:, 0].min(), corners[:, 1].max()  # the envelope's top-left corner is off the footprint
    bbox = [left + 1, top - 40, left + 40, top - 1]
    assert not shapely.Polygon(corners).intersects(shapely.box(*bbox))
    args = ["a lake"] if command == "search" else ["-c", "water", "-c", "road"]
    result = run(command, rotated, *args, "--model", tiny_model, *MODEL_ARGS, "--bbox", *bbox,
                 "--out", tmp_path / "out.gpkg")
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "does not overlap the raster rot.tif: its grid is rotated, and its footprint has the corners" in said
    assert not (tmp_path / "out.gpkg").exists()
