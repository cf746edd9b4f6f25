"""Per-model activation, `farslip models --inspect` and fp16 (--half), with tiny checkpoints on disk."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import make_tiny_clip, save_farslip1, save_farslip2, save_plain
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.engine.models import check_half, get_tokenizer, load_model, to_half
from backend.engine.registry import known_models
from backend.engine.sliding import ArraySource, Segmenter, predict_window
from backend.engine.presets import parse_class_lines
from backend.service.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (2, 3, 224, 224)).astype(np.float32))
    tokens = get_tokenizer(77)(["a satellite image of a harbour", "a road"])
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(tokens)


def test_registry_gives_gelu_to_georsclip_and_remoteclip_and_quickgelu_to_clip_and_farslip():
    registry = known_models()
    assert registry["georsclip-vit-b-32"].activation == registry["remoteclip-vit-b-32"].activation == "gelu"
    assert {registry[n].activation for n in registry if n.startswith(("farslip", "clip-"))} == {"quickgelu"}


def test_a_gelu_checkpoint_reproduces_its_own_model(tmp_path, monkeypatch):
    gelu = make_tiny_clip(patch_size=32, quick_gelu=False, seed=3)
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path))
    save_plain(gelu, tmp_path / "RS5M_ViT-B-32.pt")  # GeoRSCLIP's file name
    expected_image, expected_text = _outputs(gelu)

    loaded = load_model("georsclip-vit-b-32")
    assert loaded.metadata["activation"] == "gelu"
    image, text = _outputs(loaded.model)
    torch.testing.assert_close(image, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, expected_text, atol=1e-5, rtol=1e-5)

    # Given by path, the file name still says GeoRSCLIP; under another name the documented default
    # (QuickGELU, the OpenAI CLIP lineage) applies, and the outputs change.
    by_path = load_model(str(tmp_path / "RS5M_ViT-B-32.pt"))
    torch.testing.assert_close(_outputs(by_path.model)[0], expected_image, atol=1e-5, rtol=1e-5)
    shutil.copy(tmp_path / "RS5M_ViT-B-32.pt", tmp_path / "my_clip.pt")
    other = load_model(str(tmp_path / "my_clip.pt"))
    assert other.metadata["activation"] == "quickgelu"
    assert (_outputs(other.model)[0] - expected_image).abs().max() > 1e-3


def test_inspect_prints_the_positional_embeddings_and_checks_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path))
    save_farslip2(make_tiny_clip(context_length=248), tmp_path / "FarSLIP2_ViT-B-16.pt")
    result = runner.invoke(app, ["models", "--inspect", "farslip2-vit-b-16"])
    assert result.exit_code == 0, result.output
    assert "positional_embedding_res     248 x 64" in result.output
    assert "visual.positional_embedding  197 x 128" in result.output
    assert "LongCLIP text tower" in result.output and "248 tokens" in result.output
    assert "agrees with the file" in result.output

    # A 77-token file under a FarSLIP2 name: the registry and the file disagree, and it says so, with the exit
    # code of segment, which refuses the file under that name (it exited 0).
    save_farslip1(make_tiny_clip(), tmp_path / "FarSLIP2_ViT-B-16.pt")
    result = runner.invoke(app, ["models", "--inspect", "farslip2-vit-b-16"])
    assert result.exit_code == 3, result.output
    assert "positional_embedding         77 x 64" in result.output
    assert "stock CLIP text tower, 77 tokens" in result.output
    assert "the registry is wrong for this file" in result.output

    by_path = runner.invoke(app, ["models", "--inspect", str(tmp_path / "FarSLIP2_ViT-B-16.pt")])
    assert by_path.exit_code == 0 and "77 tokens" in by_path.output and "registry entry" not in by_path.output
    missing = runner.invoke(app, ["models", "--inspect", "farslip1-vit-b-32"])
    assert missing.exit_code == 3 and "not on this computer" in missing.output
    # Its advice (pass --weights PATH) works here too: the file is inspected under the registry name.
    save_farslip2(make_tiny_clip(context_length=248), tmp_path / "elsewhere.pt")
    elsewhere = str(tmp_path / "elsewhere.pt")
    given = runner.invoke(app, ["models", "--inspect", "farslip2-vit-b-16", "--weights", elsewhere])
    assert given.exit_code == 0 and "elsewhere.pt" in given.output and "agrees" in given.output, given.output
    alone = runner.invoke(app, ["models", "--weights", str(tmp_path / "elsewhere.pt")])
    assert alone.exit_code == 2 and "add --inspect NAME" in alone.output

    # A file that is not a CLIP at all is refused as the loader refuses it, not described as one.
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    other = runner.invoke(app, ["models", "--inspect", str(tmp_path / "other.safetensors")])
    assert other.exit_code == 3, other.output
    assert other.output.strip() == ("Error: other.safetensors: This checkpoint is not an open_clip CLIP model; only "
                                    "open_clip ViT CLIP checkpoints are supported.")


def test_half_is_refused_on_cpu_with_a_sentence(tmp_path):
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        check_half(True, torch.device("cpu"))
    check_half(False, torch.device("cpu"))
    model = save_plain(make_tiny_clip(), tmp_path / "tiny.pt")
    raster = REPO / "resources" / "sample" / "naip_2020_5m_crop.tif"
    result = runner.invoke(app, ["segment", str(raster), "-c", "water", "-c", "field", "--model", str(model),
                                 "--device", "cpu", "--half", "--out", str(tmp_path / "out.gpkg")])
    assert result.exit_code == 2 and "--half" in result.output and "needs a CUDA GPU" in result.output
    assert not (tmp_path / "out.gpkg").exists()


def test_half_runs_fp16_weights_like_open_clip_fp16_precision(tmp_path):
    path = save_plain(make_tiny_clip(), tmp_path / "tiny.pt")
    full = load_model(str(path))
    half = to_half(copy.deepcopy(full))
    dtypes = {name: p.dtype for name, p in half.model.named_parameters()}
    assert dtypes["visual.conv1.weight"] == dtypes["visual.proj"] == torch.float16
    assert dtypes["visual.transformer.resblocks.0.attn.in_proj_weight"] == torch.float16
    assert dtypes["visual.ln_post.weight"] == torch.float32  # layer norms compute in fp32
    image = np.random.default_rng(1).uniform(0, 255, (3, 260, 300)).astype(np.float32)
    classes = parse_class_lines(["water", "field", "road"])
    segmenter = Segmenter(half, classes)
    assert segmenter.half
    got = predict_window(segmenter, ArraySource(image)).probs
    expected = predict_window(Segmenter(full, classes), ArraySource(image)).probs
    assert 0 < np.abs(got - expected).max() < 0.02


def test_inspect_of_a_sam_model_says_what_it_is_not_that_it_is_unknown():
    """`farslip models` lists sam-vit-b: --inspect of that name is not an "Unknown model"."""
    result = runner.invoke(app, ["models", "--inspect", "sam-vit-b"])
    said = " ".join(result.output.split())
    assert result.exit_code == 3 and "sam-vit-b is a SAM model (for segment --refine sam)" in said, said
    assert "Unknown model" not in said
