"""What a user typed by mistake, through `farslip` as a shell runs it (bytes on the command line) and through the
HTTP API: a CRS of EPSG: and no whole number, bytes that are not UTF-8 (a Latin-1 terminal or file name), a float
raster all NaN with no nodata tag. Each ended in a traceback (exit 1, HTTP 500 or a failed job) or, for the NaN
raster, in an empty hits file and exit 0; each is now one sentence and exit 2 (HTTP 400), or exit 4 for the
raster with nothing to index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

FARSLIP = Path(sys.executable).parent / "farslip"
REPO = Path(__file__).resolve().parents[2]
NAIP_BOX = ["486500", "5206500", "488000", "5208000"]  # conftest's SMALL_BBOX


def farslip(env: dict[str, str], *args: str | bytes, cwd: Path = REPO) -> tuple[int, str]:
    """Exit status and stderr of `farslip ARGS` given as a shell gives them: bytes, UTF-8 or not."""
    done = subprocess.run([os.fsencode(FARSLIP), *(a if isinstance(a, bytes) else a.encode() for a in args)],
                          capture_output=True, env=env, cwd=cwd, timeout=300)
    said = done.stderr.decode("utf-8", "backslashreplace") + done.stdout.decode("utf-8", "backslashreplace")
    assert "Traceback" not in said and "╭" not in said, said
    return done.returncode, " ".join(said.split())


@pytest.fixture(scope="module")
def nan_raster(tmp_path_factory) -> Path:
    """300 x 300 float32 pixels, every one NaN, and no nodata value."""
    path = tmp_path_factory.mktemp("nan") / "nan.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=300, count=3, dtype="float32",
                       crs="EPSG:32633", transform=Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0)) as dst:
        dst.write(np.full((3, 300, 300), np.nan, np.float32))
    return path


@pytest.mark.parametrize("command", [["segment", "-c", "water", "-c", "road"], ["index"], ["search", "a lake"]])
def test_a_bbox_crs_of_epsg_and_no_whole_number_is_a_sentence(command, env, naip, tiny_model, tmp_path):
    code, said = farslip(env, command[0], str(naip), *command[1:], "--model", str(tiny_model), "-q", "--bbox",
                         *NAIP_BOX, "--bbox-crs", "EPSG:4326.5",
                         *(["-o", str(tmp_path / "o.gpkg")] if command[0] != "index" else []))
    assert code == 2, said
    assert said == ("Error: The bbox CRS 'EPSG:4326.5' is not a CRS I know; use e.g. EPSG:4326 or a WKT string.")
    assert list(tmp_path.iterdir()) == []


def test_bytes_that_are_not_utf8_on_the_command_line_are_a_sentence(env, naip, tiny_model, tmp_path):
    base = [str(naip), "--model", str(tiny_model), "-q", "--bbox", *NAIP_BOX]
    code, said = farslip(env, "segment", *base, "-c", b"eau\xe9", "-c", "road", "-o", str(tmp_path / "o.gpkg"))
    assert code == 2 and said.startswith("Error: The class line 'eau\\udce9' is not valid UTF-8 text (the byte 0xe9 "
                                         "is not UTF-8)"), said
    code, said = farslip(env, "search", *base, "a lake", "--keywords", b"lak\xe9", "-o", str(tmp_path / "h.gpkg"))
    assert code == 2 and said.startswith("Error: --keywords 'lak\\udce9' is not valid UTF-8 text"), said
    code, said = farslip(env, "segment", *base, "-c", "water", "-c", "road",
                         "-o", os.fsencode(tmp_path) + b"/r\xe9.gpkg")
    assert code == 2 and said.startswith("Error: The polygon output path ") and "is not valid UTF-8 text" in said, said
    assert list(tmp_path.iterdir()) == []


def test_a_raster_named_in_latin1_is_a_sentence(env, naip, tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    os.symlink(naip, os.fsencode(tmp_path / "in") + b"/r\xe9.tif")
    code, said = farslip(env, "segment", b"in/r\xe9.tif", "-c", "water", "-c", "road", "--model", str(tiny_model),
                         "-q", "-o", "o.gpkg", cwd=tmp_path)
    assert code == 2 and said.startswith("Error: The raster path 'in/r\\udce9.tif' is not valid UTF-8 text (the "
                                         "byte 0xe9 is not UTF-8): GDAL opens only files named in UTF-8."), said
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("command", [["index"], ["search", "a lake"], ["search", "a lake", "--no-keywords"]])
def test_a_raster_of_nan_has_nothing_to_index_or_search(command, env, nan_raster, tiny_model, tmp_path):
    code, said = farslip(env, command[0], str(nan_raster), *command[1:], "--model", str(tiny_model), "-q",
                         *(["-o", str(tmp_path / "h.gpkg")] if command[0] != "index" else []))
    assert code == 4, said
    assert said.startswith(f"Error: {nan_raster} holds only nodata or masked pixels (or NaN): there is nothing to "
                           "index or search."), said
    assert list(tmp_path.iterdir()) == []


def test_the_api_answers_the_same_sentences(backend, naip, nan_raster, tiny_model, tmp_path):
    out = str(tmp_path / "o.gpkg")
    cases = [
        ("/v1/segment", {"raster": str(naip), "class_lines": ["water", "road"], "model": str(tiny_model), "out": out,
                         "bbox": [float(v) for v in NAIP_BOX], "bbox_crs": "EPSG:x"},
         "The bbox CRS 'EPSG:x' is not a CRS I know"),
        ("/v1/index", {"raster": str(naip), "model": str(tiny_model), "bbox": [float(v) for v in NAIP_BOX],
                       "bbox_crs": "EPSG:abc"}, "The bbox CRS 'EPSG:abc' is not a CRS I know"),
        ("/v1/search", {"raster": str(naip), "model": str(tiny_model), "out": out, "like": [487000.0, 5207000.0],
                        "like_crs": "EPSG:x"}, "The like CRS 'EPSG:x' is not a CRS I know"),
        ("/v1/search", {"raster": str(nan_raster), "model": str(tiny_model), "out": out, "sentences": ["a lake"]},
         f"{nan_raster} holds only nodata or masked pixels (or NaN): there is nothing to index or search."),
        ("/v1/index", {"raster": str(nan_raster), "model": str(tiny_model)},
         f"{nan_raster} holds only nodata or masked pixels (or NaN): there is nothing to index or search."),
    ]
    for path, body, words in cases:
        response = backend.client.post(path, content=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, body, response.text)
        assert words in response.json()["detail"], response.text
    # JSON's "\udce9", the lone surrogate a Latin-1 byte becomes, is the request schema's refusal (422)
    for path, body in [("/v1/segment", {"raster": str(naip), "class_lines": ["eau\udce9", "road"], "out": out,
                                        "model": str(tiny_model)}),
                       ("/v1/search", {"raster": str(naip), "sentences": ["lak\udce9"], "out": out,
                                       "model": str(tiny_model)}),
                       ("/v1/segment", {"raster": str(naip), "class_lines": ["water"], "model": str(tiny_model),
                                        "out": str(tmp_path / "r\udce9.gpkg")})]:
        response = backend.client.post(path, content=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), (path, body, response.text)
        assert "valid" in response.json()["detail"], response.text
    assert list(tmp_path.iterdir()) == []
