"""evaluate-retrieval's two counting protocols (FarSLIP's, the default, and MPS-CLIP's), the images left out for
want of a caption, and the image preprocessing of open_clip's validation transform, each checked against a few
lines of reference written here from the protocols' own descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.engine.models import load_model
from backend.engine.retrieval import embed_images, evaluate_retrieval, load_caption_set
from backend.service.cli import app

PREFIX = "a satellite image. "


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_plain(make_tiny_clip(seed=7), tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(str(model_path), device="cpu")


def write_dataset(folder: Path, captions: list[list[str]], sizes: list[tuple[int, int]] | None = None) -> Path:
    """An RSICD-layout folder: dataset_rsicd.json and RSICD_images/img_<i>.png (width x height from `sizes`)."""
    rng = np.random.default_rng(3)
    (folder / "RSICD_images").mkdir(parents=True)
    entries = []
    for i, texts in enumerate(captions):
        width, height = sizes[i] if sizes else (224, 224)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
            folder / "RSICD_images" / f"img_{i}.png")
        entries.append({"filename": f"img_{i}.png", "split": "test", "imgid": i,
                        "sentences": [{"raw": text} for text in texts]})
    (folder / "dataset_rsicd.json").write_text(json.dumps({"images": entries, "dataset": "rsicd"}))
    return folder


@torch.inference_mode()
def reference_similarity(loaded, image_files: list[Path], texts: list[str]) -> np.ndarray:
    """Cosine similarity with open_clip's own validation preprocess and tokenizer."""
    preprocess = open_clip.image_transform(224, is_train=False)
    images = torch.stack([preprocess(Image.open(path)) for path in image_files])
    image_vectors = F.normalize(loaded.model.encode_image(images), dim=-1)
    text_vectors = F.normalize(loaded.model.encode_text(open_clip.tokenize(texts)), dim=-1)
    return (image_vectors @ text_vectors.T).numpy()


def top(scores: np.ndarray, k: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda j: -scores[j])[:k])


# RSICD-like: a caption repeated on one image, a caption shared by two images, sizes that are not 224 x 224.
CAPTIONS = [["a lake.", "a lake.", "a blue lake near trees.", "many cars.", "the water is calm."],
            ["many cars.", "a parking lot.", "cars in rows.", "a lot with cars.", "cars."],
            ["a road.", "a road crosses fields.", "green fields.", "a lake.", "farmland."],
            ["a bare land.", "brown land.", "bare land near a road.", "a bare land.", "some plants."]]
SIZES = [(224, 224), (300, 225), (224, 331), (256, 256)]


def test_farslip_protocol_counts_each_distinct_text_and_image_once_with_any_owner_a_hit(loaded, model_path,
                                                                                       tmp_path):
    """The figures were MPS-CLIP's counting (every caption against its one image, no prefix) though the docs
    called them the figures FarSLIP publishes; FarSLIP's evaluation counts distinct texts, any owner a hit."""
    folder = write_dataset(tmp_path / "rsicd", CAPTIONS, SIZES)
    files = sorted({folder / "RSICD_images" / f"img_{i}.png" for i in range(len(CAPTIONS))}, key=str)
    texts = sorted({PREFIX + caption for captions in CAPTIONS for caption in captions})
    owners = {text: {files.index(folder / "RSICD_images" / f"img_{i}.png")
                     for i, captions in enumerate(CAPTIONS) for caption in captions if PREFIX + caption == text}
              for text in texts}
    similarity = reference_similarity(loaded, files, texts)
    expected = {}
    for k in (1, 5, 10):
        expected[f"i2t_R@{k}"] = 100 * np.mean([bool(top(similarity[i], k) & {t for t, text in enumerate(texts)
                                                                               if i in owners[text]})
                                                for i in range(len(files))])
    for k in (1, 5, 10):
        expected[f"t2i_R@{k}"] = 100 * np.mean([bool(top(similarity[:, t], k) & owners[text])
                                                for t, text in enumerate(texts)])
    expected["mR"] = float(np.mean(list(expected.values())))

    result = evaluate_retrieval(folder, loaded)  # farslip is the default
    assert result["protocol"] == "farslip"
    assert (result["images"], result["captions"], result["distinct_captions"]) == (4, 20, len(texts))
    assert result["recalls"] == pytest.approx(expected, abs=1e-9)

    mps = evaluate_retrieval(folder, loaded, protocol="mpsclip")
    assert mps["protocol"] == "mpsclip" and mps["recalls"] != pytest.approx(expected)

    out = CliRunner().invoke(app, ["evaluate-retrieval", str(folder), "--model", str(model_path), "--device", "cpu",
                                   "--json", str(tmp_path / "r.json"), "-q"])
    assert out.exit_code == 0, out.output
    assert "Protocol farslip: FarSLIP's evaluation" in out.output
    assert f"4 images, 20 captions ({len(texts)} distinct texts scored) (test)" in out.output
    assert f"mR {expected['mR']:.2f}" in out.output
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["protocol"] == "farslip" and written["caption_prefix"] == PREFIX
    assert written["recalls"] == pytest.approx(expected, abs=1e-9)
    assert {"dataset", "caption_file", "split", "images", "captions", "model", "recalls", "notices"} <= set(written)


def test_mpsclip_protocol_scores_every_caption_against_its_one_image(loaded, model_path, tmp_path):
    folder = write_dataset(tmp_path / "rsicd", CAPTIONS, SIZES)
    files = [folder / "RSICD_images" / f"img_{i}.png" for i in range(len(CAPTIONS))]
    captions = [caption for texts in CAPTIONS for caption in texts]
    owner = [i for i, texts in enumerate(CAPTIONS) for _ in texts]
    similarity = reference_similarity(loaded, files, captions)
    # Repeated captions tie exactly; the documented rule: the one earlier in the caption JSON ranks first.
    rank_order = [sorted(range(len(captions)), key=lambda t: (-similarity[i, t], t)) for i in range(len(files))]
    expected = {f"i2t_R@{k}": 100 * np.mean([any(owner[t] == i for t in rank_order[i][:k]) for i in range(4)])
                for k in (1, 5, 10)}
    expected.update({f"t2i_R@{k}": 100 * np.mean([owner[t] in top(similarity[:, t], k)
                                                  for t in range(len(captions))]) for k in (1, 5, 10)})
    expected["mR"] = float(np.mean(list(expected.values())))
    out = CliRunner().invoke(app, ["evaluate-retrieval", str(folder), "--model", str(model_path), "--device", "cpu",
                                   "--protocol", "mpsclip", "--json", str(tmp_path / "r.json"), "-q"])
    assert out.exit_code == 0, out.output
    assert "Protocol mpsclip: MPS-CLIP's evaluation" in out.output and "4 images, 20 captions (test)" in out.output
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["protocol"] == "mpsclip" and written["caption_prefix"] == ""
    assert written["recalls"] == pytest.approx(expected, abs=1e-9)


def test_an_unknown_protocol_is_refused_before_the_model_loads(tmp_path):
    folder = write_dataset(tmp_path / "rsicd", CAPTIONS[:2])
    out = CliRunner().invoke(app, ["evaluate-retrieval", str(folder), "--model", str(tmp_path / "none.pt"),
                                   "--device", "cpu", "--protocol", "coco", "-q"])
    assert out.exit_code == 2, out.output
    assert "must be farslip (FarSLIP's evaluation) or mpsclip (MPS-CLIP's); got 'coco'" in " ".join(out.output.split())
    with pytest.raises(InputError, match="got 'coco'"):
        evaluate_retrieval(folder, None, protocol="coco")  # type: ignore[arg-type]


def test_farslip_ties_rank_the_earlier_image_and_text_first():
    from backend.engine.retrieval import farslip_recalls

    # Two images with equal scores for text 0, which only image 1 has; two texts with equal scores for image 0.
    similarity = np.array([[0.5, 0.5, 0.1],
                           [0.5, 0.2, 0.9]])
    pairs = np.array([[0, 1], [1, 0], [1, 2]])
    recalls = farslip_recalls(similarity, pairs)
    # image 0: texts 0 and 1 tie, text 0 (not its own) ranks first -> miss at 1; image 1: text 2 first -> hit.
    # text 0: images tie, image 0 (not its) first -> miss; text 1: image 0 first -> hit; text 2: image 1 -> hit.
    assert recalls["i2t_R@1"] == pytest.approx(50.0) and recalls["t2i_R@1"] == pytest.approx(200 / 3)


def test_images_whose_captions_are_all_blank_are_named_and_recorded(loaded, model_path, tmp_path):
    """They were dropped without a word ('3 images, 10 captions')."""
    captions = [CAPTIONS[0], ["  ", ""], CAPTIONS[2], CAPTIONS[3][:2]]
    folder = write_dataset(tmp_path / "rsicd", captions)
    assert load_caption_set(folder).left_out == ["img_1.png"]
    for protocol in ("farslip", "mpsclip"):
        result = evaluate_retrieval(folder, loaded, protocol=protocol)
        assert result["left_out_images"] == ["img_1.png"] and result["images"] == 3
        assert any("img_1.png" in notice and "no caption text" in notice for notice in result["notices"])
    out = CliRunner().invoke(app, ["evaluate-retrieval", str(folder), "--model", str(model_path), "--device", "cpu",
                                   "--json", str(tmp_path / "r.json"), "-q"])
    assert out.exit_code == 0, out.output
    assert ("Warning: 1 image(s) of the 'test' split in dataset_rsicd.json have no caption text and are left out "
            "of the recalls: img_1.png.") in out.output
    assert json.loads((tmp_path / "r.json").read_text())["left_out_images"] == ["img_1.png"]


@torch.inference_mode()
@pytest.mark.parametrize("size", [(225, 300), (300, 225), (331, 224), (224, 331)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_images_that_are_not_square_are_preprocessed_as_open_clip_does(loaded, tmp_path, size):
    """The long side was rounded (Resize truncates) and the crop offset floored (CenterCrop rounds)."""
    path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    ours = embed_images(loaded, [path])
    pixels = open_clip.image_transform(224, is_train=False)(Image.open(path))[None]
    reference = F.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
    assert np.abs(ours - reference).max() < 1e-5
