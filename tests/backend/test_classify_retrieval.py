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
    result = evaluate_retrieval(tmp_path / "rsicd", loaded, protocol="mpsclip")  # farslip: test_retrieval_protocols
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
                                   "--device", "cpu", "--protocol", "mpsclip", "--json", str(tmp_path / "r.json"),
                                   "-q"])
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


def test_the_release_caption_json_is_chosen_among_other_json_files(tmp_path):
    """The first .json with an 'images' list was taken: a COCO captions file beside the release's failed the run."""
    make_dataset(tmp_path / "d")
    (tmp_path / "d" / "captions_coco.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "img0.jpg"}], "annotations": []}))
    (tmp_path / "d" / "aaa_notes.json").write_text(json.dumps({"images": []}))
    chosen = load_caption_set(tmp_path / "d")
    assert chosen.caption_file.name == "dataset_rsicd.json" and len(chosen.images) == 3
    (tmp_path / "d" / "dataset_rsitmd.json").write_text((tmp_path / "d" / "dataset_rsicd.json").read_text())
    with pytest.raises(InputError, match=r"2 caption JSON files .* \(dataset_rsicd\.json, dataset_rsitmd\.json\); "
                                         "give the one to evaluate"):
        load_caption_set(tmp_path / "d")
    coco = tmp_path / "coco"
    coco.mkdir()
    (tmp_path / "d" / "captions_coco.json").rename(coco / "captions_coco.json")
    with pytest.raises(InputError, match=r"has no captioned image in the split 'test'; its images name no split "
                                         r"\(or use --split all\)"):  # 'its splits are None'
        load_caption_set(coco)


def test_the_caption_json_itself_can_be_given_for_its_folder(tmp_path):
    make_dataset(tmp_path / "d")
    from_folder = load_caption_set(tmp_path / "d")
    from_file = load_caption_set(tmp_path / "d" / "dataset_rsicd.json")  # 'The dataset folder ... does not exist'
    assert (from_file.images, from_file.captions) == (from_folder.images, from_folder.captions)
    assert from_file.caption_file == from_folder.caption_file == tmp_path / "d" / "dataset_rsicd.json"


def test_captions_longer_than_the_model_reads_are_named_in_a_notice(loaded, tmp_path):
    long_caption = " ".join(["a blue lake beside green fields and a road"] * 12)
    entries = [{"filename": f"scene_{i}.png", "split": "test",
                "sentences": [{"raw": long_caption if i < 2 else "a road"}, {"raw": "water"}]} for i in range(3)]
    folder = write_captions(tmp_path / "long", json.dumps({"images": entries}))
    result = evaluate_retrieval(folder, loaded, protocol="mpsclip")  # each caption as written, repeats counted
    assert result["caption_file"] == str(folder / "dataset_rsicd.json")
    assert len(result["notices"]) == 2
    assert result["notices"][0].startswith("The caption 'a blue lake") and "reads at most 75" in result["notices"][0]
    assert result["notices"][1].startswith("1 more of the 6 captions are longer than model")
    farslip = evaluate_retrieval(folder, loaded)  # the two images' long caption is one text, read with the prefix
    assert len(farslip["notices"]) == 1
    assert farslip["notices"][0].startswith("The caption 'a satellite image. a blue lake beside")


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
    with pytest.raises(EmptyResultError, match=r"all-nodata\.tif is nodata or masked: there is nothing to classify"):
        classify_raster(shared_data / "all-nodata.tif", ClassifyOptions(["water"]), out, loaded)
    assert list(tmp_path.iterdir()) == []


def test_classify_writes_the_true_footprint_of_tiles_on_a_rotated_raster(loaded, tmp_path):
    import shapely
    from affine import Affine

    raster = tmp_path / "rotated.tif"
    transform = Affine.translation(500000, 4600000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    data = np.random.default_rng(1).integers(0, 255, (3, 300, 300), dtype=np.uint8)
    with rasterio.open(raster, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(data)
    result = classify_raster(raster, ClassifyOptions(["water", "road"], tile=150), tmp_path / "tiles.gpkg", loaded)
    _meta, _fids, geometry, _fields = pyogrio.raw.read(tmp_path / "tiles.gpkg")
    tiles = [shapely.from_wkb(g) for g in geometry]
    assert result.tiles == len(tiles) == 4
    for tile, (row, col) in zip(tiles, [(0, 0), (0, 150), (150, 0), (150, 150)]):
        corners = [transform @ (col + dc, row + dr) for dc, dr in ((0, 0), (150, 0), (150, 150), (0, 150))]
        assert tile.area == pytest.approx(1500.0 ** 2)
        assert tile.normalize().equals_exact(shapely.Polygon(corners).normalize(), 1e-6)
    assert sum(t.area for t in tiles) == pytest.approx(shapely.union_all(tiles).area)  # no overlaps


def test_classify_shapefile_refuses_a_class_name_it_would_cut(loaded, shared_data, tmp_path):
    name = "very long class name " * 15
    with pytest.raises(InputError, match="shapefile holds at most 254"):
        classify_raster(shared_data / "naip_2020_5m.tif", ClassifyOptions([name, "road"], tile=300),
                        tmp_path / "tiles.shp", loaded)
    assert list(tmp_path.iterdir()) == []


def write_captions(folder: Path, text: bytes | str) -> Path:
    make_dataset(folder)
    path = folder / "dataset_rsicd.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return folder


def test_captions_that_are_not_text_are_named_with_their_file_and_image(tmp_path):
    entries = [{"filename": "scene_0.png", "split": "test", "sentences": [{"raw": None}]}]
    folder = write_captions(tmp_path / "null", json.dumps({"images": entries}))
    with pytest.raises(InputError, match=r"dataset_rsicd\.json, a caption of image scene_0\.png has \"raw\": null"):
        load_caption_set(folder)
    entries[0]["sentences"] = [{"raw": 5}]
    folder = write_captions(tmp_path / "number", json.dumps({"images": entries}))
    with pytest.raises(InputError, match=r"image scene_0\.png has \"raw\": 5, not text"):
        load_caption_set(folder)
    entries[0]["sentences"] = "a lake"
    folder = write_captions(tmp_path / "string", json.dumps({"images": entries}))
    with pytest.raises(InputError, match=r"'sentences' of image scene_0\.png are not a list"):
        load_caption_set(folder)
    entries[0] = {"filename": None, "imgid": 7, "split": "test", "sentences": [{"raw": "a lake"}]}
    folder = write_captions(tmp_path / "nameless", json.dumps({"images": entries}))
    with pytest.raises(InputError, match=r"imgid 7\) has \"filename\": null"):
        load_caption_set(folder)


def test_a_caption_file_that_is_not_json_or_not_utf8_is_named_with_the_place(tmp_path):
    folder = write_captions(tmp_path / "broken", '{"images": [\n  {"filename": "scene_0.png", split: "test"}]}')
    with pytest.raises(InputError, match=r"dataset_rsicd\.json is not valid JSON \(.* at line 2, column 31\)"):
        load_caption_set(folder)
    latin1 = json.dumps({"images": [{"filename": "scene_0.png", "split": "test",
                                     "sentences": [{"raw": "un lac bleu à côté"}]}]}, ensure_ascii=False)
    folder = write_captions(tmp_path / "latin1", latin1.encode("latin-1"))
    with pytest.raises(InputError, match=r"dataset_rsicd\.json is not UTF-8 text \(byte 0xe0"):
        load_caption_set(folder)


def test_retrieval_batch_size_below_one_is_refused(loaded, tmp_path):
    make_dataset(tmp_path / "d")
    for size in (0, -3):
        with pytest.raises(InputError, match=f"batch size must be a whole number from 1 to 1024; got {size}"):
            evaluate_retrieval(tmp_path / "d", loaded, batch_size=size)
