"""`segment --out x.gpkg/` (and the rasters' options, and a request's "out") named a folder; pathlib dropped the
separator and the run wrote a file x.gpkg."""

from __future__ import annotations

import subprocess

import pytest
from conftest import FARSLIP


@pytest.mark.parametrize("option, name", [("--out", "result.gpkg/"), ("--class-raster", "classes.tif/"),
                                          ("--prob-raster", "probs.tif/")])
def test_the_command_line_refuses_an_output_named_as_a_folder(env, naip, tiny_model, small_bbox, tmp_path,
                                                              option, name):
    arguments = [str(FARSLIP), "segment", str(naip), "-c", "water", "-c", "land", "--weights", str(tiny_model),
                 "--bbox", *map(str, small_bbox), "--no-region-checks"]
    if option != "--out":
        arguments += ["--out", "result.gpkg"]
    run = subprocess.run([*arguments, option, name], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == f"Error: The {option} {name} names a folder (it ends in '/'); give a file name."
    assert list(tmp_path.iterdir()) == []


def test_a_request_refuses_an_out_named_as_a_folder(backend, segment_body, out_dir):
    response = backend.client.post("/v1/segment", json=segment_body(out=str(out_dir / "result.gpkg") + "/"))
    assert response.status_code in (400, 422), response.text
    detail = response.json()["detail"]
    assert "names a folder (it ends in '/'); give a file name." in detail and "--out" not in detail, detail
    assert list(out_dir.iterdir()) == []


def test_an_out_that_is_an_existing_folder_is_refused_not_written_beside_it(backend, segment_body, out_dir):
    """An out without an extension gets .gpkg (DESIGN's output path + format); an existing folder of that name
    got a file beside it (folder.gpkg) instead of the refusal."""
    (out_dir / "results").mkdir()
    for given in ({}, {"format": "shp"}):  # with a format, too (it said: "ends in '', ... leave its extension out")
        response = backend.client.post("/v1/segment", json=segment_body(out=str(out_dir / "results"), **given))
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith(f"Cannot write polygons to {out_dir / 'results'}: it is a "
                                                    "folder; name a file in it"), response.text
    assert [path.name for path in out_dir.iterdir()] == ["results"]
    assert list((out_dir / "results").iterdir()) == []
