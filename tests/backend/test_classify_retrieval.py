"""Zero-shot tile classification, retrieval recalls on an RSICD-layout folder, and their commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.crs import CRS
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine.classify import ClassifyOptions, classify_raster
from backend.engine.dense import normalize_pixels
from backend.engine.errors import EmptyResultError, InputError
from backend.engine.models import load_model
from backend.engine.retrieval import evaluate_retrieval, load_caption_set, retrieval_recalls
from backend.service.cli import app


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_plain(make_tiny_clip(seed=5), tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(str(model_path), device="cpu")


def test_recalls_of_a_hand_made_similarity_matrix():
    # 3 images, 2 captions each. Worked out by hand:
    # image->text: image 0's own caption is 1st, image 1's 3rd, image 2's 5th -> R@1 1/3, R@5 3/3.
    # text->image: only caption 4 has its own image first; every image is within the top 3 -> R@1 1/6.
    similarity = np.array([[0.90, 0.10, 0.80, 0.20, 0.30, 0.00],
                           [0.70, 0.60, 0.50, 0.40, 0.30, 0.20],
                           [0.95, 0.90, 0.85, 0.80, 0.75, 0.10]])
    recalls = retrieval_recalls(similarity, np.array([0, 0, 1, 1, 2, 2]))
    assert recalls == pytest.approx({"i2t_R@1": 100 / 3, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
                                     "t2i_R@1": 100 / 6, "t2i_R@5": 100.0, "t2i_R@10": 100.0, "mR": 75.0})


def make_dataset(folder: Path) -> list[tuple[str, list[str]]]:
    """An RSICD-layout folder: RSICD_images/*.png (224 px, so no resizing) + dataset_rsicd.json."""
    rng = np.random.default_rng(0)
    (folder / "RSICD_images").mkdir(parents=True)
    entries, test = [], []
    texts = [["a lake", "blue water"], ["a farm field", "green crops"], ["a road crossing", "two roads"],
             ["many houses", "a dense town"]]
    for i, captions in enumerate(texts):
        name = f"scene_{i}.png"
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(folder / "RSICD_images" / name)
        split = "train" if i == 3 else "test"
        entries.append({"filename": name, "split": split, "imgid": i,
                        "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
        if split == "test":
            test.append((name, captions))
    (folder / "dataset_rsicd.json").write_text(json.dumps({"images": entries, "dataset": "rsicd"}))
    return test


@torch.inference_mode()
def test_evaluate_retrieval_matches_recalls_counted_by_the_test(loaded, model_path, tmp_path):
    test = make_dataset(tmp_path / "rsicd")
    result = evaluate_retrieval(tmp_path / "rsicd", loaded)
    assert (result["images"], result["captions"]) == (3, 6)

    images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "rsicd" / "RSICD_images" / name),
                                                      dtype=np.float32)).permute(2, 0, 1) for name, _ in test])
    image_vectors = F.normalize(loaded.model.encode_image(normalize_pixels(images)), dim=-1)
    captions = [c for _, cs in test for c in cs]
    owner = [i for i, (_, cs) in enumerate(test) for _ in cs]
    text_vectors = F.normalize(loaded.model.encode_text(loaded.tokenizer(captions)), dim=-1)
    similarity = (image_vectors @ text_vectors.T).numpy()
    expected = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(3):
            best = sorted(range(6), key=lambda t: -similarity[i, t])[:k]
            hits += any(owner[t] == i for t in best)
        expected[f"i2t_R@{k}"] = 100.0 * hits / 3
    for k in (1, 5, 10):
        hits = 0
        for t in range(6):
            best = sorted(range(3), key=lambda i: -similarity[i, t])[:k]
            hits += owner[t] in best
        expected[f"t2i_R@{k}"] = 100.0 * hits / 6
    expected["mR"] = sum(expected.values()) / 6
    assert result["recalls"] == pytest.approx(expected)

    out = CliRunner().invoke(app, ["evaluate-retrieval", str(tmp_path / "rsicd"), "--model", str(model_path),
                                   "--device", "cpu", "--json", str(tmp_path / "r.json"), "-q"])
    assert out.exit_code == 0, out.output
    assert f"mR {expected['mR']:.2f}" in out.output
    assert json.loads((tmp_path / "r.json").read_text())["recalls"] == pytest.approx(expected)
    assert load_caption_set(tmp_path / "rsicd", "all").captions[-1] == "a dense town"


def test_retrieval_folder_problems_are_sentences(tmp_path):
    with pytest.raises(InputError, match="no caption JSON"):
        load_caption_set(tmp_path)
    make_dataset(tmp_path / "d")
    with pytest.raises(InputError, match="split 'val'"):
        load_caption_set(tmp_path / "d", "val")
    (tmp_path / "d" / "RSICD_images" / "scene_0.png").unlink()
    with pytest.raises(InputError, match=r"scene_0\.png"):
        load_caption_set(tmp_path / "d")


def test_classify_writes_one_tile_per_grid_cell_with_its_top_class(loaded, shared_data, tmp_path):
    out = tmp_path / "tiles.gpkg"
    result = classify_raster(shared_data / "naip_2020_5m.tif",
                             ClassifyOptions(["water, lake", "cropland", "road"], tile=300), out, loaded)
    meta, _fids, geometry, fields = pyogrio.raw.read(out)
    columns = dict(zip(meta["fields"], fields))
    with rasterio.open(shared_data / "naip_2020_5m.tif") as src:
        assert CRS.from_user_input(meta["crs"]) == src.crs
        expected_tiles = -(-src.width // 300) * -(-src.height // 300)
        left, top = src.bounds.left, src.bounds.top
    assert result.tiles == len(columns["class"]) == expected_tiles  # NAIP has valid pixels in every tile
    assert set(columns["class"]) <= {"water", "cropland", "road"}
    assert np.all((columns["prob"] > 1 / 4 - 1e-6) & (columns["prob"] <= 1))
    import shapely

    first = shapely.from_wkb(geometry[0])
    assert first.bounds == pytest.approx((left, top - 1500, left + 1500, top))
    assert sum(c["tiles"] for c in result.classes) == result.tiles


def test_classify_refuses_bad_input_without_writing(loaded, shared_data, tmp_path):
    out = tmp_path / "tiles.gpkg"
    with pytest.raises(InputError, match="tile"):
        classify_raster(shared_data / "naip_2020_5m.tif", ClassifyOptions(["water"], tile=4), out, loaded)
    with pytest.raises(EmptyResultError):
        classify_raster(shared_data / "all-nodata.tif", ClassifyOptions(["water"]), out, loaded)
    assert list(tmp_path.iterdir()) == []
