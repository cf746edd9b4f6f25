"""`farslip train RASTER LABELS --class-field cls` as DESIGN.md writes it: without --out the model goes to a new
folder in the models folder (listed by `farslip models` and GET /v1/models, loaded by its name), never over one
that is there."""

from __future__ import annotations

from typer.testing import CliRunner

from backend.engine import models
from backend.service.cli import app
from training.model_folder import default_model_name, default_out_folder, partial_dir

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
