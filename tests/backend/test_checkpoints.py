"""Checkpoint loading: every format gives back the model it was saved from; nothing unsafe runs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from tinymodels import make_tiny_clip, save_farslip1, save_farslip2, save_plain, save_safetensors

from backend.engine import checkpoints, finetuned, models, paths, registry, weights
from backend.service import models_table
from backend.engine.errors import ModelError

TEXTS = ["a satellite image of a road", "water, lake", "building"]


def _embeddings(model, tokenizer):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(TEXTS))


def _fp16_rounded(model):
    ref = make_tiny_clip(model.visual.patch_size[0], model.context_length)
    ref.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return ref.eval()


SAVERS = {
    "plain": (save_plain, "m.pt", 77, False),
    "safetensors": (save_safetensors, "m.safetensors", 77, False),
    "farslip1": (save_farslip1, "FarSLIP1.pt", 77, True),
    "farslip2": (save_farslip2, "FarSLIP2.pt", 248, True),
}


@pytest.mark.parametrize("patch", [16, 32])
@pytest.mark.parametrize("fmt", list(SAVERS))
def test_formats_load_and_match(tmp_path, fmt, patch):
    saver, fname, ctx, fp16 = SAVERS[fmt]
    original = make_tiny_clip(patch_size=patch, context_length=ctx, seed=3)
    path = saver(original, tmp_path / fname)

    loaded = models.load_model(str(path))

    assert loaded.context_length == ctx
    assert loaded.model.context_length == ctx
    assert loaded.tokenizer(TEXTS).shape == (len(TEXTS), ctx)
    assert loaded.metadata["architecture"]["patch_size"] == patch
    assert loaded.class_lines is None
    assert loaded.model.training is False
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())

    reference = _fp16_rounded(original) if fp16 else original
    img_ref, txt_ref = _embeddings(reference, loaded.tokenizer)
    img, txt = _embeddings(loaded.model, loaded.tokenizer)
    tol = 1e-5 if fp16 else 1e-6
    assert torch.allclose(img, img_ref, atol=tol, rtol=0), (img - img_ref).abs().max()
    assert torch.allclose(txt, txt_ref, atol=tol, rtol=0), (txt - txt_ref).abs().max()
    if fp16:  # and the rounding really was the only difference
        img_orig, _ = _embeddings(original, loaded.tokenizer)
        assert (img - img_orig).abs().max() < 1e-2


def test_read_state_dict_strips_prefix_and_casts(tmp_path):
    path = save_farslip1(make_tiny_clip(32), tmp_path / "f1.pt")
    sd = checkpoints.read_state_dict(path)
    assert not any(k.startswith("module.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert "positional_embedding_res" not in checkpoints.read_state_dict(
        save_farslip2(make_tiny_clip(32, 248), tmp_path / "f2.pt"))


@pytest.mark.parametrize("patch,grid", [(16, 14), (32, 7)])
def test_architecture_inferred_from_shapes(patch, grid):
    sd = make_tiny_clip(patch_size=patch, context_length=248).state_dict()
    arch = checkpoints.describe_architecture(checkpoints.infer_architecture(sd))
    assert arch == {"patch_size": patch, "image_size": 224, "vision_width": 128, "vision_layers": 2,
                    "text_width": 64, "text_layers": 2, "context_length": 248, "vocab_size": 49408,
                    "embed_dim": 64}
    model = checkpoints.model_from_state_dict(sd)
    assert model.visual.grid_size == (grid, grid)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2
    assert model.transformer.resblocks[0].attn.num_heads == 1


def test_fold_longclip_general_shapes():
    pos = torch.arange(77 * 4, dtype=torch.float32).reshape(77, 4)
    res = -torch.arange(248 * 4, dtype=torch.float32).reshape(248, 4)
    sd = checkpoints.fold_longclip_positional({"positional_embedding": pos, "positional_embedding_res": res})
    folded = sd["positional_embedding"]
    assert folded.shape == (248, 4) and "positional_embedding_res" not in sd
    assert torch.equal(folded[:20], pos[:20]) and torch.equal(folded[20:], res[20:])
    with pytest.raises(ModelError):
        checkpoints.fold_longclip_positional({"positional_embedding": torch.zeros(77, 4),
                                         "positional_embedding_res": torch.zeros(248, 8)})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle"])
def test_pickle_with_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": make_tiny_clip(32).state_dict(), "hook": _Evil(marker)}
    if how == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(ModelError, match="Refusing"):
        models.load_model(str(path))
    assert not marker.exists()


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = save_plain(make_tiny_clip(32), tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="not a readable"):
        checkpoints.read_state_dict(path)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ModelError):
        checkpoints.read_state_dict(bad)


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError) as err:
        models.load_model("farslip3-vit-z")
    msg = str(err.value)
    assert "farslip3-vit-z" in msg
    for name in registry.known_models():
        assert name in msg


def test_offline_without_weights_names_file_repo_and_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(ModelError) as err:
        models.load_model("farslip2-vit-b-16")
    msg = str(err.value)
    assert "FarSLIP2_ViT-B-16.pt" in msg
    assert "ZhenShiL/FarSLIP" in msg
    assert str(tmp_path / "weights") in msg
    assert err.value.exit_code != 0


def test_registry_model_from_weights_dir(tmp_path, monkeypatch):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(wdir))
    path = save_farslip2(make_tiny_clip(16, 248, seed=5), wdir / "FarSLIP2_ViT-B-16.pt")
    loaded = models.load_model()  # the default model
    assert loaded.name == registry.DEFAULT_MODEL == "farslip2-vit-b-16"
    assert loaded.context_length == 248
    assert loaded.metadata["weights_path"] == str(path)
    assert loaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    entry = {m["name"]: m for m in models.list_models()}["farslip2-vit-b-16"]
    assert entry["present"] is True and entry["path"] == str(path) and entry["kind"] == "registry"
    assert "farslip2-vit-b-16" in models_table.format_models_table()


def test_weights_of_the_wrong_architecture_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path))
    save_farslip1(make_tiny_clip(16), tmp_path / "FarSLIP1_ViT-B-32.pt")
    with pytest.raises(ModelError, match="patch-16"):
        models.load_model("farslip1-vit-b-32")


def test_explicit_weights_path(tmp_path):
    path = save_farslip1(make_tiny_clip(32, seed=2), tmp_path / "mine.pt")
    loaded = models.load_model("farslip1-vit-b-32", weights=str(path))
    assert loaded.name == "farslip1-vit-b-32" and loaded.metadata["weights_path"] == str(path)
    alone = models.load_model(None, weights=str(path))
    assert alone.name == "mine"
    with pytest.raises(ModelError, match="does not exist"):
        models.load_model("farslip1-vit-b-32", weights=str(tmp_path / "missing.pt"))


def test_registry_model_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path / "empty"))
    rev = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--chendelong--RemoteCLIP"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    path = save_plain(make_tiny_clip(32), repo / "snapshots" / rev / "RemoteCLIP-ViT-B-32.pt")
    loaded = models.load_model("remoteclip-vit-b-32")
    assert loaded.metadata["weights_path"] == str(path)


def test_weights_hash_is_cached(tmp_path):
    path = save_plain(make_tiny_clip(32), tmp_path / "h.pt")
    first = weights.file_sha256(path)
    cache = json.loads((paths.cache_dir() / weights.HASH_CACHE_FILE).read_text())
    assert cache[str(path.resolve())]["sha256"] == first
    # a stale size/mtime forces a rehash; a matching one is trusted
    cache[str(path.resolve())]["sha256"] = "cached"
    (paths.cache_dir() / weights.HASH_CACHE_FILE).write_text(json.dumps(cache))
    assert weights.file_sha256(path) == "cached"
    os.utime(path, ns=(0, 0))
    assert weights.file_sha256(path) == first


def _finetuned_dir(root, name="roads"):
    d = root / name
    d.mkdir(parents=True)
    model = make_tiny_clip(16, seed=7)
    save_safetensors(model, d / finetuned.FINETUNED_WEIGHTS)
    meta = {"format": finetuned.FINETUNED_FORMAT, "base_model": "farslip1-vit-b-16",
            "class_lines": ["road, parking lot", "building", "tree"], "metrics": {}, "version": "0.1.0"}
    (d / finetuned.FINETUNED_META).write_text(json.dumps(meta))
    return d, model


def test_finetuned_dir_loads_with_class_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("FARSLIP_MODELS", str(tmp_path / "models"))
    d, original = _finetuned_dir(tmp_path / "models")
    loaded = models.load_model(str(d))
    assert loaded.class_lines == ["road, parking lot", "building", "tree"]
    assert loaded.metadata["kind"] == "finetuned"
    img, txt = _embeddings(loaded.model, loaded.tokenizer)
    img_ref, txt_ref = _embeddings(original, loaded.tokenizer)
    assert torch.allclose(img, img_ref, atol=1e-6) and torch.allclose(txt, txt_ref, atol=1e-6)
    by_name = models.load_model("roads")  # found in models_dir() by its folder name
    assert by_name.class_lines == loaded.class_lines
    entry = {m["name"]: m for m in models.list_models()}["roads"]
    assert entry["kind"] == "finetuned" and entry["present"] and entry["path"] == str(d)
    assert entry["arch"] == "ViT-B-16"


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a fine-tuned model"):
        models.load_model(str(tmp_path))


def test_registry_is_complete():
    known = registry.known_models()
    assert registry.DEFAULT_MODEL in known
    files = {s.hf_file for s in known.values() if s.hf_repo == "ZhenShiL/FarSLIP"}
    assert files == {"FarSLIP1_ViT-B-32.pt", "FarSLIP1_ViT-B-16.pt", "FarSLIP2_ViT-B-32.pt",
                     "FarSLIP2_ViT-B-16.pt"}
    for spec in known.values():
        assert spec.context_length == (248 if spec.name.startswith("farslip2") else 77)
        assert spec.licence and spec.description
        assert spec.arch in ("ViT-B-16", "ViT-B-32") or (spec.text_tower and spec.arch.endswith("-ViT-B-32"))
    local = [s.weights_filename for s in known.values()]
    assert len(local) == len(set(local)), "two models would share one file in the weights directory"


@pytest.mark.parametrize("change, words", [
    ({"context_length": "abc"}, "'context_length' must be a whole number above 0; got \"abc\""),
    ({"processing": "x"}, "'processing' must be an object"),
    ({"processing": {"gsd_m": "abc"}}, "'processing.gsd_m' must be a number above 0"),
    ({"processing": {"bands_chosen": [0, 1, 2]}}, "'processing.bands_chosen' must be a list of band numbers"),
    ({"languages": "pt"}, "'languages' must be a list of language codes"),
    ({"name": ["x"]}, "'name' must be a text"),
])
def test_a_broken_model_description_is_one_sentence_and_the_other_models_still_list(change, words, tmp_path,
                                                                                    monkeypatch):
    """One bad value in a fine-tuned model's farslip_model.json broke `farslip models` and GET /v1/models for
    every model (a ValueError), and a run died in a traceback; the broken folder was still offered by name."""
    monkeypatch.setenv("FARSLIP_MODELS", str(tmp_path / "models"))
    _finetuned_dir(tmp_path / "models", "good")
    broken, _ = _finetuned_dir(tmp_path / "models", "broken")
    meta = json.loads((broken / finetuned.FINETUNED_META).read_text())
    (broken / finetuned.FINETUNED_META).write_text(json.dumps(meta | change))
    listed = {m["name"] for m in models.list_models()}
    assert "good" in listed and "broken" not in listed
    table = models_table.format_models_table()  # `farslip models` says why the folder is not offered
    assert "Not offered: fine-tuned model folder broken: " in table and words in table
    assert "fine-tuned model folder good" not in table
    with pytest.raises(ModelError) as refused:
        models.load_model("broken")
    assert words in str(refused.value)
    with pytest.raises(ModelError) as unknown:
        models.load_model("no-such-model")
    assert "good" in str(unknown.value) and "broken" not in str(unknown.value)


def test_a_model_description_with_a_byte_order_mark_is_read(tmp_path):
    folder, _ = _finetuned_dir(tmp_path)
    meta_file = folder / finetuned.FINETUNED_META
    meta_file.write_bytes(b"\xef\xbb\xbf" + meta_file.read_bytes())
    assert models.load_model(str(folder)).class_lines == ["road, parking lot", "building", "tree"]


def test_a_safetensors_file_under_a_pt_name_is_read_by_its_content(tmp_path):
    """Saved as the registry's FarSLIP2_ViT-B-16.pt, a safetensors file was called 'neither a complete zip archive,
    a pickle nor safetensors'."""
    model = make_tiny_clip()
    save_safetensors(model, tmp_path / "w.safetensors")
    renamed = tmp_path / "FarSLIP2_ViT-B-16.pt"
    (tmp_path / "w.safetensors").rename(renamed)
    loaded = checkpoints.read_state_dict(renamed)
    expected = checkpoints.read_state_dict(save_safetensors(model, tmp_path / "again.safetensors"))
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")  # looks like one, is not
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        checkpoints.read_state_dict(garbage)


def test_a_finetuned_models_own_weights_file_loads_as_its_folder(tmp_path):
    """`--model gelu-model/model.safetensors` (the file `farslip train --out gelu-model` wrote beside its
    farslip_model.json) loaded as a bare checkpoint: QuickGELU instead of the recorded GELU, no classes, the
    name 'model'. It is the folder's model wherever a model path is taken; any other file stays a checkpoint."""
    from backend.engine.inspect_weights import inspect_model

    folder, _ = _finetuned_dir(tmp_path, "gelu-model")
    meta = json.loads((folder / finetuned.FINETUNED_META).read_text())
    (folder / finetuned.FINETUNED_META).write_text(json.dumps(meta | {"activation": "gelu", "name": "gelu-model"}))
    file = folder / finetuned.FINETUNED_WEIGHTS
    by_folder = models.load_model(str(folder))
    for loaded in (models.load_model(str(file)), models.load_model(None, weights=str(file)),
                   models.load_model("farslip1-vit-b-16", weights=str(file))):
        assert (loaded.name, loaded.class_lines) == ("gelu-model", ["road, parking lot", "building", "tree"])
        assert loaded.metadata["activation"] == "gelu" and loaded.metadata["kind"] == "finetuned"
        assert loaded.metadata["finetuned"] == by_folder.metadata["finetuned"]
        assert loaded.weights_id == by_folder.weights_id
    assert models.locate_model(str(file)) == ("finetuned", folder, None)
    assert inspect_model(str(file))["activation"] == "gelu"
    copy = folder / "copy.safetensors"  # not the file the description is of: a checkpoint like any other
    copy.write_bytes(file.read_bytes())
    assert models.locate_model(str(copy))[0] == "checkpoint"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / finetuned.FINETUNED_WEIGHTS).write_bytes(file.read_bytes())  # no farslip_model.json beside it
    assert models.load_model(str(alone / finetuned.FINETUNED_WEIGHTS)).metadata["kind"] == "checkpoint"


def test_the_loaded_model_is_told_by_what_it_is_not_by_its_name(tmp_path, monkeypatch):
    """GET /v1/models marked the entry whose name was the loaded model's: a local file clip-vit-b-16.safetensors
    marked the registry's clip-vit-b-16 (not on this computer) and its polygons said clip-vit-b-16, and a
    fine-tuned folder outside the models folder marked the one of its name inside it, or nothing."""
    monkeypatch.setenv("FARSLIP_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path / "weights"))
    model = make_tiny_clip(16, seed=3)
    local = save_safetensors(model, tmp_path / "clip-vit-b-16.safetensors")

    def marked(loaded) -> list[str]:
        identity = models.loaded_identity(loaded)
        return [entry["name"] for entry in models.list_models() if models.is_loaded(entry, identity)]

    loaded = models.load_model(str(local))
    assert loaded.name == "clip-vit-b-16.safetensors" and marked(loaded) == []
    assert models.loaded_identity(loaded) == {"name": "clip-vit-b-16.safetensors", "kind": "checkpoint",
                                              "path": str(local), "weights_sha256": loaded.weights_id}
    other = save_safetensors(model, tmp_path / "tiny.safetensors")
    assert models.load_model(str(other)).name == "tiny"  # a name no model has: the file's stem, as before

    spec = registry.known_models()["clip-vit-b-16"]
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / spec.weights_filename).write_bytes(local.read_bytes())  # now it is that model's file
    assert models.load_model(str(local)).name == "clip-vit-b-16"
    by_path = models.load_model(str(tmp_path / "weights" / spec.weights_filename))
    assert marked(by_path) == ["clip-vit-b-16"]
    assert marked(models.load_model("clip-vit-b-16")) == ["clip-vit-b-16"]

    inside, _ = _finetuned_dir(tmp_path / "models", "roads")
    outside, _ = _finetuned_dir(tmp_path / "elsewhere", "roads")
    assert marked(models.load_model(str(outside))) == []
    assert models.loaded_identity(models.load_model(str(outside)))["path"] == str(outside)
    assert marked(models.load_model("roads")) == ["roads"] == marked(models.load_model(str(inside)))
