"""`farslip train RASTER LABELS --class-field cls` as DESIGN.md writes it: without --out the model goes to a new
folder in the models folder (listed by `farslip models` and GET /v1/models, loaded by its name), never over one
that is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backend.engine import models
from backend.engine.finetuned import FINETUNED_META
from backend.service.cli import app
from training.model_folder import (CHECKPOINT_DIR, OWNER_FILE, UNCLAIMED_GRACE_S, default_model_name,
                                   default_out_folder, partial_dir)

REPO = Path(__file__).resolve().parents[2]
NAIP = REPO.parent / "shared" / "data" / "naip_2020_5m.tif"
LABELS = REPO.parent / "shared" / "data" / "solaris_geotiff_labels.geojson"  # class field: building

runner = CliRunner()


def _train(raster, labels, model, *extra):
    return runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--base-model", str(model),
                               "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu",
                               "-q", *extra])


def test_train_without_out_writes_a_new_model_in_the_models_folder(synthetic, tiny_model, tmp_path, monkeypatch):
    root = tmp_path / "models"  # not made yet: the training makes it
    monkeypatch.setenv("FARSLIP_MODELS", str(root))
    raster, labels, _ = synthetic
    name = default_model_name(raster, labels)
    assert name == f"{raster.stem}-{labels.stem}"
    first = _train(raster, labels, tiny_model)
    assert first.exit_code == 0, first.output
    assert f"the model goes to {root / name} (--model {name} loads it)" in first.output
    assert first.output.strip().endswith(f"Wrote {root / name}; use it with --model {name}.")
    second = _train(raster, labels, tiny_model)  # the first is kept: the next number
    assert second.exit_code == 0, second.output
    assert f"Wrote {root / name}-2; use it with --model {name}-2." in second.output
    listed = {entry["name"]: entry for entry in models.list_models()}
    assert listed[name]["kind"] == listed[f"{name}-2"]["kind"] == "finetuned"
    assert models.locate_model(name) == ("finetuned", root / name, None)

    (root / f"{name}-3").write_text("someone's file")  # neither a file, a working folder nor a taken path is used
    partial_dir(root / f"{name}-4").mkdir()
    assert default_out_folder(raster, labels, taken=[str(root / f"{name}-5")]) == root / f"{name}-6"
    # --model NAME looks in the current folder first: a folder there of the next free name is skipped too.
    (tmp_path / "here" / f"{name}-6").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert default_out_folder(raster, labels, taken=[str(root / f"{name}-5")]) == root / f"{name}-7"

    refused = _train(raster, labels, tiny_model, "--resume")
    assert refused.exit_code == 2 and "--resume continues the training of the folder --out names" in refused.output


def test_a_default_name_is_typed_as_it_is_and_never_a_registry_models(tmp_path, monkeypatch):
    monkeypatch.setenv("FARSLIP_MODELS", str(tmp_path / "models"))
    assert default_model_name("/d/my raster (2020).tif", "/d/roofs & roads.gpkg|layername=x") == \
        "my-raster-2020-roofs-roads"
    assert default_model_name('NETCDF:"/d/scene.nc":rgb', "/d/scene.gpkg") == "scene"
    # Long names in other scripts fit a folder name's bytes (the training was refused as "too long").
    russian = default_model_name("/d/" + "Ортофотоплан_северного_участка_лесничества_2024" * 2 + ".tif",
                                 "/d/" + "разметка_водных_объектов" * 4 + ".geojson")
    assert russian.startswith("Ортофотоплан") and len(russian.encode("utf-8")) <= 121
    assert len(default_model_name("/d/" + "東京" * 80 + ".tif", "/d/" + "道路" * 80 + ".gpkg").encode()) <= 121
    assert default_out_folder("/d/farslip2-vit-b-16.tif", "/d/farslip2-vit-b-16.gpkg").name == "farslip2-vit-b-16-2"


def test_an_interrupted_trainings_sentence_names_resume_once_in_each_form(tmp_path):
    """Over HTTP '--resume' becomes '"resume": true': the sentence said '(--resume, "resume": true)', served as
    '("resume": true, "resume": true)'."""
    from backend.service.http_words import for_http
    from training.model_folder import CHECKPOINT_DIR, interrupted_training

    out = tmp_path / "model"
    (partial_dir(out) / CHECKPOINT_DIR).mkdir(parents=True)
    (partial_dir(out) / CHECKPOINT_DIR / "state.pt").write_bytes(b"kept")
    said = interrupted_training(out)
    assert said is not None and said.count("--resume") == 1 and "--out" in said
    served = for_http(said, "train")
    assert served.count('"resume": true') == 1 and '"out"' in served, served


def test_a_training_killed_after_choosing_its_default_folder_leaves_the_name_free(tmp_path, monkeypatch):
    """`farslip train` without --out, killed (SIGKILL, a closed terminal) once it has said where the model goes:
    its reservation of that name (a working folder holding only its owner file) stayed, and every later training
    of the same files went to NAME-2, the name the user had been told never coming back. Now the next training
    takes the abandoned name over; a working folder that holds anything more is kept."""
    root, home = tmp_path / "models", tmp_path / "home"
    env = {**os.environ, "FARSLIP_MODELS": str(root), "FARSLIP_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("FARSLIP_MODELS", str(root))
    monkeypatch.chdir(tmp_path)
    name = default_model_name(NAIP, LABELS)
    command = [sys.executable, "-m", "backend.service.launch", "train", str(NAIP), str(LABELS), "--class-field",
               "building"]

    def killed_once_it_says_where() -> str:
        run = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        assert run.stderr is not None
        said = run.stderr.readline()
        run.kill()
        run.wait(timeout=60)
        return said

    said = killed_once_it_says_where()
    assert f"the model goes to {root / name} " in said, said
    left = partial_dir(root / name)
    assert sorted(os.listdir(left)) == [OWNER_FILE], "the kill left the reservation"

    # The next training is told the same name, and takes it (killed again, it leaves the reservation again).
    said = killed_once_it_says_where()
    assert f"the model goes to {root / name} (--model {name} loads it)" in said, said
    assert sorted(os.listdir(root)) == [left.name] and sorted(os.listdir(left)) == [OWNER_FILE]

    # A training refused for its options chooses no folder: it neither takes the name nor says where a model it
    # will not make would have gone (that sentence comes once the inputs are checked).
    again = subprocess.run([*command, "--epochs", "0"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("Error: --epochs must be"), again.stderr
    assert "the model goes to" not in again.stderr, again.stderr
    assert sorted(os.listdir(root)) == [left.name] and sorted(os.listdir(left)) == [OWNER_FILE]

    # An unclaimed working folder (the kill came between making it and writing its owner) is free once it is old.
    (left / OWNER_FILE).unlink()
    assert default_out_folder(NAIP, LABELS) == root / f"{name}-2", "a fresh one may still be claimed"
    old = time.time() - 2 * UNCLAIMED_GRACE_S
    os.utime(left, (old, old))
    assert default_out_folder(NAIP, LABELS) == root / name


@pytest.mark.parametrize("holds", ["a checkpoint to resume", "a trained model kept", "a live training"])
def test_a_working_folder_with_more_than_an_abandoned_reservation_is_never_taken_over(tmp_path, monkeypatch, holds):
    root = tmp_path / "models"
    monkeypatch.setenv("FARSLIP_MODELS", str(root))
    monkeypatch.chdir(tmp_path)
    name = default_model_name(NAIP, LABELS)
    work = partial_dir(root / name)
    work.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if holds == "a live training":
            (work / OWNER_FILE).write_text(json.dumps({"pid": other.pid}))
        else:
            (work / OWNER_FILE).write_text(json.dumps({"pid": _dead_pid()}))
            kept = work / (f"{CHECKPOINT_DIR}/state.pt" if holds == "a checkpoint to resume" else FINETUNED_META)
            kept.parent.mkdir(exist_ok=True)
            kept.write_text("kept")
        before = sorted(str(path.relative_to(work)) for path in work.rglob("*"))
        assert default_out_folder(NAIP, LABELS) == root / f"{name}-2"
        assert sorted(str(path.relative_to(work)) for path in work.rglob("*")) == before
    finally:
        other.kill()
        other.wait()


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    assert ended.wait(timeout=60) == 0
    return ended.pid
