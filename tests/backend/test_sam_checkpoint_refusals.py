"""`--refine sam` with SAM weights that do not fit their configuration (a lone file of another size read as
ViT-B, a config.json of another image size, tensors of another architecture, a truncated file) is refused in
one sentence (exit 3) before the engine computes a tile, on the command line, in segment_raster (which
server jobs run) and in a `farslip serve` job; a lone .safetensors file is read with the config.json beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from tinymodels import save_tiny_sam

from backend.engine.errors import ModelError
from backend.engine.options import SegmentOptions
from backend.engine.segment import segment_raster

FARSLIP = Path(sys.executable).parent / "farslip"
REPO = Path(__file__).resolve().parents[2]
SMALL_BBOX = ["486500", "5206500", "488000", "5208000"]  # 300 x 300 pixels of the NAIP image


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny-sam", image_size=256)


def _lone(sam: Path, folder: Path) -> Path:
    """The tiny SAM's weights alone in a folder: read as ViT-B, which they are not."""
    folder.mkdir()
    return Path(shutil.copy(sam / "model.safetensors", folder / "lone.safetensors"))


def _config_of_another_size(sam: Path, folder: Path) -> Path:
    """The 256-pixel weights beside the config.json of a 512-pixel SAM."""
    bigger = save_tiny_sam(folder.parent / "sam-512", image_size=512)
    folder.mkdir()
    shutil.copy(sam / "model.safetensors", folder / "model.safetensors")
    shutil.copy(bigger / "config.json", folder / "config.json")
    return folder


def _config_with_fewer_layers(sam: Path, folder: Path) -> Path:
    """Weights of a two-layer image encoder with a one-layer configuration: tensors it has no place for."""
    shutil.copytree(sam, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["num_hidden_layers"] = 1  # its layer 0 as in the weights (windowed)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _truncated(sam: Path, folder: Path) -> Path:
    folder.mkdir()
    data = (sam / "model.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(data[:len(data) // 2])
    return folder / "cut.safetensors"


BAD = {  # how to make it, what the sentence says
    "lone file of another size": (_lone, ["lone.safetensors", "do not fit the SAM configuration",
                                          "a lone .safetensors file", "put its config.json beside the file"]),
    "config of another image size": (_config_of_another_size, ["model.safetensors", "do not fit the SAM "
                                                               "configuration in", "config.json", "vision_encoder"]),
    "tensors of another architecture": (_config_with_fewer_layers, ["do not fit the SAM configuration in",
                                                                    "vision_encoder.layers.1.",
                                                                    "has no place for"]),
    "truncated file": (_truncated, ["cut.safetensors", "is not a readable safetensors file"]),
}


def farslip(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(FARSLIP), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=env)


@pytest.mark.parametrize("case", list(BAD))
def test_weights_that_do_not_fit_are_refused_in_one_sentence_before_any_tile(case, tmp_path, tiny_sam,
                                                                             tiny_model, shared_data):
    make, words = BAD[case]
    sam = make(tiny_sam, tmp_path / "given")
    out = tmp_path / "out"
    out.mkdir()
    # Not --quiet: the dense pass would print its "0/48 tiles" progress line first.
    run = farslip("segment", shared_data / "naip_2020_5m.tif", "-c", "a", "-c", "b", "--model", tiny_model,
                  "--device", "cpu", "--refine", "sam", "--sam-model", sam, "--out", out / "l.gpkg")
    assert run.returncode == 3, run.stderr
    error = run.stderr.strip()
    assert error.startswith("Error: ") and "\n" not in error, error  # one sentence, no traceback
    assert "Traceback" not in run.stderr + run.stdout and "tiles" not in run.stderr + run.stdout
    for word in words:
        assert word in error, (word, error)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", list(BAD))
def test_segment_raster_refuses_them_before_its_dense_pass(case, tmp_path, tiny_sam, tiny_model, shared_data):
    """What a server job (and any caller of the engine) runs: no progress reported, no file written."""
    from backend.engine.models import load_model

    make, words = BAD[case]
    sam = make(tiny_sam, tmp_path / "given")
    out = tmp_path / "out"
    out.mkdir()
    progress: list = []
    options = SegmentOptions(raster=shared_data / "naip_2020_5m.tif", class_lines=["a", "b"], refine="sam",
                             sam_model=str(sam), out=out / "l.gpkg")
    with pytest.raises(ModelError) as refused:
        segment_raster(options, load_model(str(tiny_model), device="cpu"),
                       progress=lambda *done: progress.append(done))
    assert all(word in str(refused.value) for word in words), str(refused.value)
    assert progress == [] and list(out.iterdir()) == []


@pytest.mark.parametrize("given", ["the folder's own model.safetensors", "a renamed copy beside its config.json"])
def test_a_lone_file_is_read_with_the_config_json_beside_it(given, tmp_path, tiny_sam, tiny_model, shared_data):
    if given == "the folder's own model.safetensors":
        sam = tiny_sam / "model.safetensors"
    else:
        (tmp_path / "copy").mkdir()
        sam = Path(shutil.copy(tiny_sam / "model.safetensors", tmp_path / "copy" / "weights.safetensors"))
        shutil.copy(tiny_sam / "config.json", tmp_path / "copy" / "config.json")
    out = tmp_path / "o.gpkg"
    run = farslip("segment", shared_data / "naip_2020_5m.tif", "-c", "a", "-c", "b", "--model", tiny_model,
                  "--device", "cpu", "--bbox", *SMALL_BBOX, "--refine", "sam", "--sam-model", sam, "--out", out,
                  "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert report["sam"]["window"] == 256 and report["sam"]["weights"] == str(sam)


def test_a_server_job_fails_with_the_same_sentence_before_any_tile(tmp_path, tiny_sam, tiny_model, shared_data):
    sam = _config_of_another_size(tiny_sam, tmp_path / "given")
    out = tmp_path / "out"
    out.mkdir()
    args = ["segment", shared_data / "naip_2020_5m.tif", "-c", "a", "-c", "b", "--model", tiny_model,
            "--device", "cpu", "--refine", "sam", "--sam-model", sam, "--out", out / "cli.gpkg"]
    sentence = farslip(*args).stderr.strip().removeprefix("Error: ")
    assert "do not fit the SAM configuration" in sentence

    state, connection = tmp_path / "state", tmp_path / "conn.json"
    env = dict(os.environ, FARSLIP_DEVICE="cpu", PYTHONUNBUFFERED="1")
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([str(FARSLIP), "serve", "--port", "0", "--state-dir", str(state),
                                   "--connection-file", str(connection)], stdout=subprocess.DEVNULL, stderr=log,
                                  env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                info = json.loads(connection.read_text())
                if info.get("pid") == server.pid:
                    break
            except (OSError, ValueError):
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        with httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {info['token']}"},
                          timeout=30) as client:
            response = client.post("/v1/segment", json={
                "raster": str(shared_data / "naip_2020_5m.tif"), "class_lines": ["a", "b"], "model": str(tiny_model),
                "refine": "sam", "sam_model": str(sam), "out": str(out / "server.gpkg")})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
                assert time.monotonic() < deadline + 120, job
                time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(60)
    assert job["state"] == "failed" and job["error"] == sentence, job
    assert job["tiles_done"] == 0 and list(out.iterdir()) == []


def test_a_stray_tensor_beside_the_models_own_is_left_out_not_refused(tmp_path, tiny_sam, tiny_model, shared_data):
    """A checkpoint holding a tensor the model has no place for (a buffer an older transformers saved) but
    every tensor it needs, each of its shape, loads as before: the stray tensor is left out."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_sam, tmp_path / "stray"))
    state = load_file(str(folder / "model.safetensors"))
    state["prompt_encoder.old_buffer"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    out = tmp_path / "o.gpkg"
    run = farslip("segment", shared_data / "naip_2020_5m.tif", "-c", "a", "-c", "b", "--model", tiny_model,
                  "--device", "cpu", "--bbox", *SMALL_BBOX, "--refine", "sam", "--sam-model", folder, "--out", out,
                  "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))["sam"]["window"] == 256
