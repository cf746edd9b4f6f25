"""`farslip evaluate --calibrate-quality` on labelled tiles whose true IoU is all the same (a model that gets every
tile right, or every tile wrong): no estimate's ranking of them can be measured (SROCC and PLCC are NaN). Before,
NaN "ranked no worse" than the built-in estimate, so the new calibration was written, with bare NaN literals (no
JSON reader takes them) and an intercept that made every polygon's quality 1.0 (or 0); the line printed "SROCC
nan". Now the built-in estimate is kept and the run says why in plain words; --force-calibration still writes
the new one, as valid JSON with null for the figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin
from training_data import write_labels
from typer.testing import CliRunner

from backend.service.cli import app
from training.quality_calibration import choose, scored, verdict

runner = CliRunner()
NAN = {"srocc": float("nan"), "plcc": float("nan"), "tiles": 16}
MEASURED = {"srocc": 0.2, "plcc": 0.1, "tiles": 16}
POOR = {"srocc": -0.5, "plcc": -0.5, "tiles": 16}
COLOURS = {"water": (40, 70, 160), "forest": (40, 120, 50), "field": (200, 190, 90), "urban": (150, 150, 150)}


def four_bands(folder: Path, size: int = 320) -> tuple[Path, Path]:
    """Four horizontal bands of one colour each, 24 label boxes (EPSG:4326) inside them: with the tiny random
    model every 64-pixel tile of one band is predicted alike, so all tiles have the same true IoU."""
    rng = np.random.default_rng(0)
    band = size // 4
    rgb = np.zeros((3, size, size), np.float32)
    for i, colour in enumerate(COLOURS.values()):
        rgb[:, i * band:(i + 1) * band, :] = np.asarray(colour, np.float32)[:, None, None]
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    transform = from_origin(500000, 5000000, 2.0, 2.0)
    raster = folder / "r2.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as ds:
        ds.write(rgb)
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    geometries, values = [], []
    for i, name in enumerate(COLOURS):
        for k in range(6):
            (x0, y0), (x1, y1) = transform @ (k * 53 + 4, i * band + 10), transform @ (k * 53 + 48, i * band + 70)
            box = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            geometries.append(shapely.transform(box, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0],
                                                                                                    xy[:, 1]))))
            values.append(name)
    return raster, write_labels(folder / "lab2.gpkg", geometries, values, "EPSG:4326")


def strict_json(path: Path):
    """The file read by a JSON reader that takes no NaN or Infinity."""
    def refuse(constant: str):
        raise AssertionError(f"{path} holds the bare literal {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def calibrate(raster: Path, labels: Path, model: Path, folder: Path, *extra: str):
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--weights",
                                 str(model), "--device", "cpu", "-q", "--calibrate-quality",
                                 "--quality-out", str(folder / "q.json"), "--json", str(folder / "m.json"), *extra])
    return result.exit_code, result.output.strip().splitlines()


@pytest.fixture(scope="module")
def bands(tmp_path_factory) -> tuple[Path, Path]:
    return four_bands(tmp_path_factory.mktemp("bands"))


def test_a_calibration_that_cannot_be_scored_is_not_written(bands, tiny_model, tmp_path):
    raster, labels = bands
    code, lines = calibrate(raster, labels, tiny_model, tmp_path)
    assert code == 0, lines
    assert not (tmp_path / "q.json").exists()  # segment keeps the built-in estimate
    summary = lines[-1]
    assert summary.startswith("Quality estimate on 16 tiles: ")
    assert "The new calibration could not be scored: all 16 labelled tiles have the same true IoU" in summary
    assert "Nothing was written and segment keeps using the built-in estimate" in summary
    assert "nan" not in summary.replace(str(tmp_path), "").lower()
    assert "SROCC not measurable" in summary
    report = strict_json(tmp_path / "m.json")["quality_calibration"]
    assert report["written"] is False and report["kept"] == "default" and report["file_at_target"] == "none"
    assert report["calibrated"]["srocc"] is None and report["default"]["plcc"] is None


def test_forced_it_is_written_as_valid_json(bands, tiny_model, tmp_path):
    raster, labels = bands
    code, lines = calibrate(raster, labels, tiny_model, tmp_path, "--force-calibration")
    assert code == 0, lines
    assert "could not be scored" in lines[-1] and "anyway, as --force-calibration asks" in lines[-1]
    stored = strict_json(tmp_path / "q.json")
    assert stored["metrics"]["out_of_fold"]["srocc"] is None and stored["metrics"]["default"]["plcc"] is None
    assert strict_json(tmp_path / "m.json")["quality_calibration"]["written"] is True
    # Calibrating again beside it, unforced: the stored calibration (null figures) is read, not replaced.
    code, lines = calibrate(raster, labels, tiny_model, tmp_path, "--overwrite")
    assert code == 0, lines
    assert "could not be scored" in lines[-1] and "nan" not in lines[-1].replace(str(tmp_path), "").lower()
    assert strict_json(tmp_path / "q.json") == stored


def test_an_unscored_calibration_never_wins():
    nan = {"srocc": float("nan"), "plcc": float("nan"), "tiles": 16}
    measured = {"srocc": 0.2, "plcc": 0.1, "tiles": 16}
    assert choose({"new": nan, "default": nan}) == "default"
    assert choose({"new": nan, "default": measured}) == "default"
    assert choose({"new": nan, "existing": nan, "default": nan}) == "existing"
    assert choose({"new": measured, "default": nan}) == "new"
    # An existing calibration whose ranking could not be measured does not win over a built-in estimate's that was.
    poor = {"srocc": -0.5, "plcc": -0.5, "tiles": 16}
    assert choose({"new": poor, "existing": nan, "default": measured}) == "default"
    assert choose({"new": nan, "existing": nan, "default": measured}) == "default"
    assert choose({"new": poor, "existing": measured, "default": nan}) == "existing"


@pytest.mark.parametrize("scores, kept", [
    ({"new": NAN, "default": NAN}, "default"),
    ({"new": NAN, "existing": NAN, "default": NAN}, "existing"),
    ({"new": NAN, "existing": NAN, "default": MEASURED}, "default"),
    ({"new": POOR, "existing": NAN, "default": MEASURED}, "default"),
])
def test_the_sentence_never_says_nan(scores, kept):
    unscored = None if scored(scores["new"]) else "all 16 labelled tiles have the same true IoU (0.00 %)"
    assert choose(scores) == kept
    sentence = verdict(kept, scores, Path("q.json"), forced=False, unscored=unscored)
    assert "nan" not in sentence.lower() and "ranks the tiles worse than the built-in" not in sentence, sentence
