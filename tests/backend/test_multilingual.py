"""Class names in the analyst's own language: models with a Hugging Face (XLM-R) text tower load like the
others, prompts follow the class name's language, English-only models warn, and names in any script
survive into every output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from safetensors.torch import save_file
from tinymodels import (
    TEN_LANGUAGE_SENTENCES,
    make_tiny_clip,
    make_tiny_multilingual_clip,
    make_tiny_text_tower,
    save_plain,
)
from typer.testing import CliRunner
from sample_rasters import naip_corner

from backend.engine import languages
from backend.engine.errors import ModelError
from backend.engine.models import load_model
from backend.engine.text import TextEmbedder, encode_tokens
from backend.service.cli import app

runner = CliRunner()
# One class name per language RS-M-CLIP knows, plus Arabic and Hebrew (right-to-left scripts).
NAMES = {"pt": "edifício", "de": "Gebäude", "es": "carretera", "fr": "forêt", "nl": "gebouw",
         "it": "fiume", "zh": "建筑物", "ko": "건물", "ru": "здание"}


def save_checkpoint(model, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory) -> Path:
    """A checkpoint folder as a user would keep it: weights + the tower's files in text_tower/."""
    root = tmp_path_factory.mktemp("rsmclip")
    tower = make_tiny_text_tower(root / "text_tower")
    return save_checkpoint(make_tiny_multilingual_clip(tower), root / "tiny-rs-m-clip.safetensors")


@pytest.fixture(scope="module")
def small_raster(tmp_path_factory, shared_data) -> Path:
    """A 192x192 corner of the NAIP sample (same CRS, bands and nodata): keeps each run short."""
    return naip_corner(shared_data, tmp_path_factory.mktemp("raster") / "naip_small.tif", 192)


@pytest.fixture(scope="module")
def english_only(tmp_path_factory) -> Path:
    return save_plain(make_tiny_clip(16), tmp_path_factory.mktemp("en") / "tiny16.pt")


def test_a_checkpoint_with_an_xlm_r_tower_loads_offline_with_its_own_tokenizer(multilingual):
    loaded = load_model(str(multilingual))
    assert loaded.metadata["languages"] == list(languages.LANGUAGES)
    assert loaded.metadata["text_tower"]["tokenizer"] == str(multilingual.parent / "text_tower")
    tokens = loaded.tokenizer(["건물", "uma fotografia aérea de edifícios"])
    assert tokens.shape == (2, loaded.context_length)
    # The tower's own tokenizer: the Korean word is not the unknown token.
    assert 3 not in tokens[0, 1:3].tolist()
    # Plain GELU, as open_clip's XLM-R models; the loaded model reproduces the saved one.
    assert loaded.metadata["activation"] == "gelu"
    original = make_tiny_multilingual_clip(multilingual.parent / "text_tower")
    pixels = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(loaded.model.encode_image(pixels), original.encode_image(pixels), atol=1e-5)
        assert torch.allclose(loaded.model.encode_text(tokens), original.encode_text(tokens), atol=1e-5)
    # The image side is the same dense path as for CLIP models.
    assert loaded.model.visual.conv1.kernel_size == (16, 16)


def test_truncated_text_encoding_equals_the_towers_full_forward(multilingual):
    loaded = load_model(str(multilingual))
    prompts = [s[: 5 + 7 * i] for i, s in enumerate(TEN_LANGUAGE_SENTENCES)]
    tokens = loaded.tokenizer(prompts)
    with torch.inference_mode():
        full = loaded.model.encode_text(tokens)
        short = encode_tokens(loaded.model, tokens)
    assert (tokens == 1).sum() > 0 and short.shape == full.shape
    # Padding is masked out of attention and of the mean pooling: truncation changes nothing.
    assert torch.allclose(short, full, atol=1e-5), (short - full).abs().max()


def test_the_registry_model_finds_its_tower_in_the_weights_directory(multilingual, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    (weights / "xlm-roberta-base").mkdir(parents=True)
    # RS-M-CLIP is a ViT-B-32: a patch-32 file under its name (a patch-16 one is refused, below).
    save_checkpoint(make_tiny_multilingual_clip(multilingual.parent / "text_tower", patch_size=32),
                    weights / "RS-M-CLIP.safetensors")
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(weights))
    with pytest.raises(ModelError) as missing:
        load_model("rs-m-clip")
    message = str(missing.value)
    assert "config.json" in message and "tokenizer.json" in message and "xlm-roberta-base" in message
    assert "\n" not in message
    for item in (multilingual.parent / "text_tower").iterdir():
        shutil.copy(item, weights / "xlm-roberta-base" / item.name)
    loaded = load_model("rs-m-clip")
    assert loaded.name == "rs-m-clip" and len(loaded.metadata["languages"]) == 10


def test_missing_tower_files_are_named_in_one_sentence_by_the_cli(multilingual, tmp_path, small_raster):
    lonely = tmp_path / "alone.safetensors"
    shutil.copy(multilingual, lonely)
    result = runner.invoke(app, ["segment", str(small_raster), "-c", "edifício",
                                 "--model", str(lonely), "--out", str(tmp_path / "x.gpkg"), "--quiet"])
    assert result.exit_code == 3, result.output
    assert "config.json and tokenizer.json are missing" in result.output
    assert not (tmp_path / "x.gpkg").exists()


@pytest.mark.parametrize(("name", "code"), [*[(n, c) for c, n in NAMES.items()],
                                             ("building", "en"), ("bare soil", "en"), ("مبنى", None),
                                             ("בניין", None), ("zzkq", None)])
def test_a_class_names_language_is_detected_from_script_letters_and_words(name, code):
    assert languages.detect_language(name) == code


def test_each_language_has_short_templates_with_a_slot_and_english_keeps_the_methods_80():
    assert len(languages.templates_for("en")) == 80
    for code in languages.LANGUAGES:
        templates = languages.templates_for(code)
        assert templates and all(t.count("{}") == 1 for t in templates)
        assert len(set(templates)) == len(templates)
    assert languages.templates_for("pt") != languages.templates_for("es")


def test_templates_follow_each_query_and_can_be_forced(multilingual, english_only):
    loaded = load_model(str(multilingual))
    embedder = TextEmbedder(loaded, use_disk_cache=False)
    assert embedder.templates_for("edifício") == languages.templates_for("pt")
    assert embedder.templates_for("건물") == languages.templates_for("ko")
    assert embedder.templates_for("building") == languages.templates_for("en")
    assert embedder.templates_for("مبنى") == languages.templates_for("en")  # no templates: English fallback
    forced = TextEmbedder(loaded, use_disk_cache=False, language="de")
    assert forced.templates_for("building") == languages.templates_for("de")
    # English-only models read only English prompts, whatever the name's language.
    plain = TextEmbedder(load_model(str(english_only)), use_disk_cache=False)
    assert plain.templates_for("edifício") == languages.templates_for("en")
    # A different template set is a different embedding (and a different cache entry).
    assert not torch.allclose(embedder.embed_one("gebouw"), forced.embed_one("gebouw"))


def test_an_unknown_language_is_refused_with_the_choices():
    with pytest.raises(Exception) as error:
        languages.check_language("klingon")
    assert "pt (Portuguese)" in str(error.value)


def test_english_only_model_warns_about_foreign_class_names_and_still_runs(english_only, small_raster, tmp_path):
    out = tmp_path / "w.gpkg"
    result = runner.invoke(app, ["segment", str(small_raster), "-c", "edifício",
                                 "-c", "건물", "--model", str(english_only), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "multilingual" in warnings[0] and "rs-m-clip" in warnings[0]
    report = json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert report["warnings"] == [warnings[0].removeprefix("Warning: ")]
    english = runner.invoke(app, ["segment", str(small_raster), "-c", "building", "-c", "road",
                                  "--model", str(english_only), "--out", str(tmp_path / "e.gpkg"), "--quiet"])
    assert english.exit_code == 0 and "Warning" not in english.output


UNICODE_CLASSES = ["edifício, prédio", "建筑物", "건물", "здание", "مبنى", "Gebäude"]


@pytest.mark.parametrize("suffix", [".gpkg", ".shp", ".geojson", ".fgb"])
def test_class_names_in_any_script_survive_into_every_output(multilingual, small_raster, tmp_path, suffix):
    out = tmp_path / f"classes{suffix}"
    args = ["segment", str(small_raster), "--model", str(multilingual), "--out", str(out),
            "--class-raster", str(tmp_path / "c.tif"), "--prob-raster", str(tmp_path / "p.tif"), "--quiet"]
    for line in UNICODE_CLASSES:
        args += ["-c", line]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    names = [line.split(",")[0] for line in UNICODE_CLASSES]
    meta, _, _, fields = pyogrio.raw.read(out)
    written = set(fields[list(meta["fields"]).index("class")])
    assert written and written <= set(names)
    if suffix == ".shp":
        assert out.with_suffix(".cpg").read_text().strip().upper() in ("UTF-8", "UTF8")
    report = json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert [c["class"] for c in report["classes"]] == names
    with rasterio.open(tmp_path / "c.tif") as ds:
        tags = ds.tags(1)
        assert [tags[f"CLASS_{i}"] for i in range(len(names))] == names
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert list(ds.descriptions) == names
        assert np.isfinite(ds.read(1)).all()


def test_a_multilingual_model_fine_tunes_and_its_folder_carries_the_tower(multilingual, tmp_path):
    from training_data import fast_options, make_synthetic

    from training.api import train_model

    (tmp_path / "scene").mkdir()
    raster, labels, _ = make_synthetic(tmp_path / "scene", size=192)
    out = tmp_path / "tuned"
    train_model(raster, labels, "cls", out, base_model=str(multilingual), epochs=1, lr=1e-3,
                options=fast_options())
    meta = json.loads((out / "farslip_model.json").read_text(encoding="utf-8"))
    assert meta["languages"] == list(languages.LANGUAGES) and meta["text_tower"]
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (out / "text_tower").iterdir()}
    # The original tower folder is gone: the fine-tuned model loads from its own copy.
    moved = tmp_path / "elsewhere"
    shutil.copytree(multilingual.parent, moved)
    shutil.rmtree(multilingual.parent / "text_tower")
    try:
        reloaded = load_model(str(out))
    finally:
        shutil.copytree(moved / "text_tower", multilingual.parent / "text_tower")
    assert reloaded.metadata["text_tower"]["tokenizer"] == str(out / "text_tower")
    assert reloaded.class_lines == ["forest", "sand", "water"]
    assert TextEmbedder(reloaded, use_disk_cache=False).templates_for("floresta") == languages.templates_for("pt")


def test_the_language_can_be_forced_on_the_command_line(multilingual, small_raster, tmp_path):
    out = tmp_path / "de.gpkg"
    forced = runner.invoke(app, ["segment", str(small_raster), "-c", "building", "-c", "water", "--model",
                                 str(multilingual), "--language", "de", "--out", str(out), "--quiet"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))["options"]["language"] == "de"
    wrong = runner.invoke(app, ["segment", str(small_raster), "-c", "building", "--model", str(multilingual),
                                "--language", "klingon", "--out", str(tmp_path / "k.gpkg"), "--quiet"])
    assert wrong.exit_code == 2 and "pt (Portuguese)" in wrong.output


def test_one_class_alone_and_foreign_names_are_warned_about_by_classify_as_by_segment(english_only, small_raster,
                                                                                      tmp_path):
    """One class gets every pixel (and every tile) with probability 1; classify said nothing of it, nor of
    class names an English-only model cannot read."""
    for command, out in (("segment", "s.gpkg"), ("classify", "c.gpkg")):
        alone = runner.invoke(app, [command, str(small_raster), "-c", "building", "--model", str(english_only),
                                    "--out", str(tmp_path / out), "--quiet"])
        assert alone.exit_code == 0, alone.output
        said = [line for line in alone.output.splitlines() if line.startswith("Warning:")]
        assert said == ["Warning: Only one class ('building'): the classes compete for each pixel, so a class alone "
                        "gets every pixel with probability 1. Add the classes it should be told apart from (e.g. "
                        "what surrounds it, or 'background')."], (command, alone.output)
        report = json.loads((tmp_path / out).with_suffix(".report.json").read_text(encoding="utf-8"))
        assert report["warnings"] == [said[0].removeprefix("Warning: ")]
    synonyms = runner.invoke(app, ["segment", str(small_raster), "-c", "water, lake", "--model", str(english_only),
                                   "--out", str(tmp_path / "w.gpkg"), "--quiet"])
    assert synonyms.exit_code == 0 and "gets every pixel (its synonyms only compete among themselves)" in \
        synonyms.output and "probability 1" not in synonyms.output
    foreign = runner.invoke(app, ["classify", str(small_raster), "-c", "edifício", "-c", "건물", "--model",
                                  str(english_only), "--out", str(tmp_path / "f.gpkg"), "--quiet"])
    assert foreign.exit_code == 0 and "Warning: Model" in foreign.output and "rs-m-clip" in foreign.output


def test_a_class_name_too_long_for_the_text_tower_is_named_after_the_run(english_only, small_raster, tmp_path):
    """The tokenizer cut a long class name to the model's context without a word (segment and classify)."""
    long_name = "building " * 90
    for command, out in (("segment", "s.gpkg"), ("classify", "c.gpkg")):
        result = runner.invoke(app, [command, str(small_raster), "-c", long_name, "-c", "road", "--model",
                                     str(english_only), "--out", str(tmp_path / out), "--quiet"])
        assert result.exit_code == 0, result.output
        said = [line for line in result.output.splitlines() if line.startswith("Warning:")]
        assert len(said) == 1 and "reads at most 75 tokens of each prompt made of a class name" in said[0], said
        assert "'building building" in said[0] and "'road'" not in said[0]
    short = runner.invoke(app, ["classify", str(small_raster), "-c", "building", "-c", "road", "--model",
                                str(english_only), "--out", str(tmp_path / "short.gpkg"), "--quiet"])
    assert short.exit_code == 0 and "Warning" not in short.output


def test_names_a_fine_tuned_model_learnt_are_not_warned_about_and_long_ones_are_shortened(english_only):
    """A model fine-tuned on 'edifício, house' has learnt that name: no warning for it; another foreign name
    is still named, cut to 40 characters as the token warning cuts it, and the model is named as every
    interface names it."""
    from backend.engine.models import load_model
    from backend.engine.text import language_warnings
    from backend.engine.presets import parse_class_lines

    loaded = load_model(str(english_only))
    loaded.class_lines = ["Edifício, house", "ground"]
    long_name = "edifício " * 20
    [said] = language_warnings(loaded, parse_class_lines(["edifício", "건물", long_name]))
    assert "'edifício'" not in said and "'건물'" in said, said
    assert repr(long_name[:40]) + "..." in said and long_name not in said
    assert "(e.g. rs-m-clip)" in said and "--model" not in said
    loaded.class_lines = None
    [before] = language_warnings(loaded, parse_class_lines(["edifício"]))
    assert "'edifício'" in before


def test_a_file_of_another_patch_size_under_the_registry_name_is_refused_and_inspect_says_so(multilingual, tmp_path,
                                                                                           monkeypatch):
    """The check stock CLIP files get (patch size of the registry's architecture), for a Hugging Face text tower;
    --inspect says the same, without a context length the file does not hold."""
    weights = tmp_path / "weights"
    shutil.copytree(multilingual.parent / "text_tower", weights / "xlm-roberta-base")
    shutil.copy(multilingual, weights / "RS-M-CLIP.safetensors")  # patch 16
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(weights))
    with pytest.raises(ModelError, match=r"is a patch-16 checkpoint, but model 'rs-m-clip' is .*-32\."):
        load_model("rs-m-clip")
    result = runner.invoke(app, ["models", "--inspect", "rs-m-clip"])
    said = " ".join(result.output.split())
    assert result.exit_code == 3 and "but the file has patch 16: the registry is wrong for this file" in said, said
    assert "None" not in said
