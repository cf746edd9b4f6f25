"""An output file named with a trailing separator (`--json jj/`) names a folder; pathlib dropped the "/" and the
run wrote a plain file `jj` (evaluate --json, --png, --quality-out, train --json, and a POST /v1/evaluate body's
"out_json"). Now such a name is refused before anything runs, as an existing folder is, and nothing is written."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.engine.files import check_output_file, check_output_files
from backend.service.cli import app
from backend.service.evaluate_jobs import check_evaluate_request

runner = CliRunner()


def farslip(*args) -> tuple[int, list[str]]:
    result = runner.invoke(app, [*map(str, args), "--device", "cpu", "-q"])
    return result.exit_code, result.output.strip().splitlines()


@pytest.mark.parametrize("option, name, extra", [
    ("--json", "jj/", []),
    ("--png", "pp/", []),
    ("--quality-out", "qdir/", ["--calibrate-quality"]),
    ("--quality-out", "ABSOLUTE/qdir/", ["--calibrate-quality"]),
])
def test_evaluate_refuses_an_output_file_named_as_a_folder(synthetic, tiny_model, tmp_path, monkeypatch, option,
                                                           name, extra):
    raster, labels, _ = synthetic
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    name = name.replace("ABSOLUTE", str(work))
    code, lines = farslip("evaluate", raster, labels, "--class-field", "cls", "--weights", tiny_model, option, name,
                          *extra)
    assert (code, lines) == (2, [f"Error: The {option} file {name} names a folder (it ends in '/'); give a file "
                                 "name."])
    assert os.listdir(work) == []


def test_train_refuses_a_json_file_named_as_a_folder(synthetic, tiny_model, tmp_path, monkeypatch):
    raster, labels, _ = synthetic
    monkeypatch.chdir(tmp_path)
    code, lines = farslip("train", raster, labels, "--class-field", "cls", "--weights", tiny_model, "--out", "m",
                          "--json", "tj/")
    assert (code, lines) == (2, ["Error: The --json file tj/ names a folder (it ends in '/'); give a file name."])
    assert os.listdir(tmp_path) == []


def test_an_evaluate_request_refuses_out_json_named_as_a_folder(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    request = {"raster": str(raster), "labels": str(labels), "class_field": "cls", "model": str(tiny_model),
               "out_json": f"{tmp_path}/jj2/"}
    with pytest.raises(InputError) as refused:
        check_evaluate_request(request)
    assert str(refused.value) == f"The out_json {tmp_path}/jj2/ names a folder (it ends in '/'); give a file name."
    assert os.listdir(tmp_path) == []
    assert check_evaluate_request({**request, "out_json": f"{tmp_path}/jj2.json"}) == [f"{tmp_path}/jj2.json"]


@pytest.mark.parametrize("name", ["out.gpkg/", "out/", "sub//"])
def test_every_output_checked_by_name_refuses_a_folder_name(tmp_path, name):
    """The check every run's outputs pass (segment's class raster and report, search's hits, scale runs ...)
    refuses the name as given, before it becomes a Path."""
    given = f"{tmp_path}/{name}"
    with pytest.raises(InputError, match=r"names a folder \(it ends in '/'\); give a file name\.$"):
        check_output_file(given, "class raster")
    with pytest.raises(InputError, match=r"^The polygons file .* names a folder"):
        check_output_files({"polygons file": given, "run report": f"{tmp_path}/out.report.json"})
    assert os.listdir(tmp_path) == []
