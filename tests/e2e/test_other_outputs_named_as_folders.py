"""The outputs of `search`, `classify`, `evaluate-retrieval`, `bench` and `serve` named with a trailing separator
name a folder. They were typer Paths, which drop the separator: `search --out hits.gpkg/` wrote a file hits.gpkg
(and its report) and said it had. Refused before any work, as segment's, train's and evaluate's outputs are."""

from __future__ import annotations

import subprocess

import pytest
from conftest import FARSLIP


def _run(env, cwd, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(FARSLIP), *arguments], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", ["search", "classify"])
def test_search_and_classify_refuse_an_out_named_as_a_folder(env, naip, tiny_model, small_bbox, tmp_path, command):
    words = ["a lake"] if command == "search" else ["-c", "water", "-c", "land"]
    run = _run(env, tmp_path, command, str(naip), *words, "--weights", str(tiny_model), "--bbox",
               *map(str, small_bbox), "--out", "hits.gpkg/")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == "Error: The --out file hits.gpkg/ names a folder (it ends in '/'); give a file name."
    assert list(tmp_path.iterdir()) == []


def test_search_still_writes_a_plain_out(env, naip, tiny_model, small_bbox, tmp_path):
    own_cache = {**env, "FARSLIP_CACHE": str(tmp_path.parent / "own-cache")}  # the session's index stays unbuilt
    run = _run(own_cache, tmp_path, "search", str(naip), "a lake", "--weights", str(tiny_model), "--bbox",
               *map(str, small_bbox), "--top", "2", "--out", "./hits.gpkg", "-q")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.gpkg", "hits.report.json"]


def test_evaluate_retrieval_and_bench_refuse_a_json_named_as_a_folder(env, tmp_path):
    retrieval = _run(env, tmp_path, "evaluate-retrieval", str(tmp_path), "--json", "figures.json/")
    assert retrieval.returncode == 2, retrieval.stderr
    assert retrieval.stderr.strip() == ("Error: The --json file figures.json/ names a folder (it ends in '/'); "
                                        "give a file name.")
    bench = _run(env, tmp_path, "bench", "--device", "cpu", "--json", "figures.json/")
    assert bench.returncode == 2, bench.stderr
    assert bench.stderr.strip() == ("Error: The figures file (--json) figures.json/ names a folder (it ends in "
                                    "'/'); give a file name.")
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_connection_file_named_as_a_folder(env, tmp_path):
    run = _run(env, tmp_path, "serve", "--state-dir", str(tmp_path / "state"), "--connection-file", "backend.json/",
               timeout=60)  # a backend that starts instead would serve until killed
    assert run.returncode == 2, run.stderr
    assert "The --connection-file backend.json/ names a folder (it ends in '/'); give a file name." in run.stderr
    assert not (tmp_path / "backend.json").exists()


def test_a_search_request_refuses_an_out_named_as_a_folder(backend, tiny_model, naip, small_bbox, out_dir):
    response = backend.client.post("/v1/search", json={
        "raster": str(naip), "sentences": ["a lake"], "bbox": small_bbox, "model": str(tiny_model),
        "out": str(out_dir / "hits.gpkg") + "/"})
    assert response.status_code in (400, 422), response.text
    assert "names a folder (it ends in '/'); give a file name." in response.json()["detail"], response.text
    assert list(out_dir.iterdir()) == []
