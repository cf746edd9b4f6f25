"""`--refine edges` and `--refine sam`: sharper outlines, measured and pinned on real and synthetic rasters."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain, save_tiny_sam
from typer.testing import CliRunner

from backend.engine import refine
from backend.engine import sam as sam_module
from backend.engine.raster import PixelWindow
from backend.engine.refine import refine_edges, refine_edges_blocks
from backend.engine.sam import Prompt, SamSettings, coarse_resolution_warning, fuse, refine_with_sam, window_cores
from backend.engine.sam_models import load_sam
from backend.engine.sliding import UNCLASSIFIED, ArraySource
from backend.engine.vectorize import vectorize_class_raster
from backend.service.cli import app
from backend.service.refine_bench import coarse_probabilities, fields_scene, measure_scene, measured_scenes

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[2] / "resources" / "sample" / "naip_2020_5m_crop.tif"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_plain(make_tiny_clip(16), tmp_path_factory.mktemp("models") / "tiny16.pt")


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> Path:
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny-sam", image_size=256)


def write_scene(path: Path, scene) -> Path:
    """A synthetic scene as an RGB GeoTIFF (UTM, 1 m), nodata 0 outside its valid pixels."""
    rgb = np.clip(scene.rgb, 1, 255).astype(np.uint8)
    rgb[:, ~scene.valid] = 0
    profile = {"driver": "GTiff", "width": rgb.shape[2], "height": rgb.shape[1], "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000, 5_000_000, 1.0, 1.0), "nodata": 0}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(rgb)
    return path


def segment(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


# --------------------------------------------------------------------------- edges


def test_edge_refinement_raises_miou_and_boundary_f_on_every_scene(shared_data):
    for scene in measured_scenes(shared_data):
        result = measure_scene(scene)
        assert result["raised_both"], result
        assert result["nodata_respected"], result


def test_edge_refinement_streamed_in_blocks_equals_the_whole_image(tmp_path, monkeypatch):
    scene = fields_scene(seed=3, size=200, collar=True)
    probs = coarse_probabilities(scene.truth, scene.valid, scene.num_classes)
    whole = refine_edges(probs, scene.rgb, scene.valid)
    prob_path = tmp_path / "probs.tif"
    with rasterio.open(prob_path, "w", driver="GTiff", width=200, height=200, count=4, dtype="float32") as ds:
        ds.write(probs.astype(np.float32))
    monkeypatch.setattr(refine, "REFINE_BLOCK", 48)
    source = ArraySource(scene.rgb, scene.valid)
    request = PixelWindow(30, 20, 150, 170)
    streamed = np.full((4, 150, 170), -1.0, np.float32)
    for block, block_probs, _, _ in refine_edges_blocks(source, request, PixelWindow(0, 0, 200, 200), prob_path):
        streamed[:, block.row_off - 30:block.row_off - 30 + block.height,
                 block.col_off - 20:block.col_off - 20 + block.width] = block_probs
    np.testing.assert_allclose(streamed, whole[:, 30:180, 20:190], atol=1e-5)


def test_refined_classes_do_not_depend_on_the_requested_extent_and_keep_nodata(tmp_path, tiny_clip):
    raster = write_scene(tmp_path / "fields.tif", fields_scene(seed=4, size=320, collar=True))
    assert segment(raster, "-c", "forest", "-c", "field", "--model", tiny_clip, "--refine", "edges",
                   "--out", tmp_path / "whole.gpkg", "--class-raster", tmp_path / "whole.tif",
                   "--device", "cpu", "-q").exit_code == 0
    bbox = (500000 + 90, 5_000_000 - 250, 500000 + 260, 5_000_000 - 60)  # rows 60..250, cols 90..260
    result = segment(raster, "-c", "forest", "-c", "field", "--model", tiny_clip, "--refine", "edges",
                     "--bbox", *bbox, "--out", tmp_path / "part.gpkg", "--class-raster", tmp_path / "part.tif",
                     "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "whole.tif") as whole_ds, rasterio.open(tmp_path / "part.tif") as part_ds, \
            rasterio.open(raster) as image:
        whole, part = whole_ds.read(1), part_ds.read(1)
        masked = image.dataset_mask() == 0
    np.testing.assert_array_equal(part, whole[60:250, 90:260])
    assert (whole[masked] == 255).all() and (whole[~masked] != 255).all()
    report = json.loads((tmp_path / "part.report.json").read_text())
    assert report["refine"]["method"] == "edges" and report["refine"]["halo_px"] == refine.halo_px()
    # The unrefined polygons come beside the refined ones, to compare in QGIS.
    assert report["outputs"]["coarse_vector"] == str(tmp_path / "part_coarse.gpkg")
    coarse_info = pyogrio.read_info(tmp_path / "part_coarse.gpkg")
    refined_info = pyogrio.read_info(tmp_path / "part.gpkg")
    assert coarse_info["crs"] == refined_info["crs"] and coarse_info["features"] > 0
    assert "quality" in refined_info["fields"]


# --------------------------------------------------------------------------- SAM


def test_fusion_keeps_agreeing_sam_masks_and_drops_disagreeing_ones():
    classes = np.zeros((20, 20), np.uint8)
    classes[:, 10:] = 1
    own = np.full((20, 20), 0.7)
    own[:, 8:14] = 0.55                           # the patch grid hesitates near the boundary
    probs = np.stack([np.where(classes == 0, own, 1 - own), np.where(classes == 1, own, 1 - own)]).astype(np.float32)
    valid = np.ones((20, 20), bool)
    right = Prompt(1, classes == 1, (10, 0, 20, 20), [(15, 10)], [1])
    agreeing = np.zeros((20, 20), bool)
    agreeing[:, 12:] = True                       # SAM says the object starts two columns further right
    refined, kept = fuse(classes, probs, valid, [right], [agreeing], min_agreement=0.5)
    assert kept == [True]
    assert (refined[:, 12:] == 1).all() and (refined[:, 10:12] == 0).all() and (refined[:, :10] == 0).all()

    disagreeing = np.zeros((20, 20), bool)
    disagreeing[:5, :5] = True                    # a mask on the other class's ground: IoU 0 with the region
    refined, kept = fuse(classes, probs, valid, [right], [disagreeing], min_agreement=0.5)
    assert kept == [False]
    np.testing.assert_array_equal(refined, classes)

    masked = valid.copy()
    masked[:, 15:] = False                        # SAM may not claim nodata pixels
    refined, _ = fuse(classes, probs, masked, [right], [agreeing], min_agreement=0.3)
    assert (refined[:, 15:] == classes[:, 15:]).all()


def test_sam_moves_a_boundary_only_where_the_class_map_hesitates_and_never_below_the_threshold():
    # Columns 0-9 "field" (0), 10-19 "road" (1); a third class is never likely. The class map is sure
    # (0.8) except in columns 8-13, where the top two classes are within 0.1.
    classes = np.zeros((20, 20), np.uint8)
    classes[:, 10:] = 1
    top = np.where((np.arange(20) >= 8) & (np.arange(20) < 14), 0.48, 0.8)[None].repeat(20, axis=0)
    second = np.where(top == 0.8, 0.1, 0.42)
    probs = np.stack([np.where(classes == 0, top, second), np.where(classes == 1, top, second),
                      1 - top - second]).astype(np.float32)
    valid = np.ones((20, 20), bool)
    road = Prompt(1, classes == 1, (10, 0, 20, 20), [(15, 10)], [1])
    shrunk = np.zeros((20, 20), bool)
    shrunk[:, 16:] = True                         # SAM ends the road six columns further right
    refined, kept = fuse(classes, probs, valid, [road], [shrunk], min_agreement=0.4)
    assert kept == [True]
    assert (refined[:, 10:14] == 0).all()         # hesitant road pixels: the runner-up, field
    assert (refined[:, 14:] == 1).all()           # sure road pixels stay road, mask or not
    assert (refined[:, :10] == 0).all()

    field = Prompt(0, classes == 0, (0, 0, 10, 20), [(5, 10)], [1])
    grown = np.zeros((20, 20), bool)
    grown[:, :16] = True                          # SAM runs the field six columns into the road
    refined, _ = fuse(classes, probs, valid, [field], [grown], min_agreement=0.5)
    assert (refined[:, :14] == 0).all() and (refined[:, 14:] == 1).all()

    # With a threshold of 0.45 the runner-up (0.42) may not be given, and an unclassified pixel
    # (below the threshold for every class) is not given the mask's class.
    refined, _ = fuse(classes, probs, valid, [road], [shrunk], min_agreement=0.4, threshold=0.45)
    assert (refined[:, 10:] == 1).all()
    unclassified = classes.copy()
    unclassified[:, 8:14] = UNCLASSIFIED          # the threshold's class map: 0.48 is below 0.5
    refined, _ = fuse(unclassified, probs, valid, [field], [grown], min_agreement=0.5, threshold=0.5)
    np.testing.assert_array_equal(refined, unclassified)


def test_window_cores_split_overlaps_once():
    cores = window_cores(600, 256, 192)
    assert [c[0] for c in cores] == [0, 192, 344]
    assert cores[0][1] == 0 and cores[-1][2] == 600
    assert all(a[2] == b[1] for a, b in zip(cores, cores[1:]))


def _box_masks(sam, embedding, prompts, shape):
    """SAM's answer replaced by each prompt's box: a deterministic outline to check the seams with."""
    masks = []
    for prompt in prompts:
        mask = np.zeros(shape, bool)
        x0, y0, x1, y1 = (int(v) for v in prompt.box)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
    return masks, [0.9] * len(prompts)


def _coarse_scene_files(folder: Path, truth: np.ndarray):
    """A scene's image and its coarse class and probability rasters, as the engine leaves them for SAM."""
    size = truth.shape[0]
    valid = np.ones(truth.shape, bool)
    probs = coarse_probabilities(truth, valid, 2)
    rgb = np.where(truth == 1, 200.0, 60.0)[None].repeat(3, axis=0).astype(np.float32)
    profile = {"driver": "GTiff", "width": size, "height": size, "crs": "EPSG:32633",
               "transform": from_origin(0, size, 1, 1)}
    class_path, prob_path, refined_path = folder / "c.tif", folder / "p.tif", folder / "r.tif"
    for path in (class_path, refined_path):
        with rasterio.open(path, "w", count=1, dtype="uint8", nodata=255, **profile) as ds:
            ds.write(probs.argmax(axis=0).astype(np.uint8), 1)
    with rasterio.open(prob_path, "w", count=2, dtype="float32", **profile) as ds:
        ds.write(probs)
    return ArraySource(rgb), probs, class_path, prob_path, refined_path


def test_object_crossing_a_sam_window_border_is_one_polygon(tmp_path, tiny_sam):
    sam = load_sam(str(tiny_sam))
    size = 400
    truth = np.zeros((size, size), np.uint8)
    truth[100:180, 150:350] = 1                   # crosses the core border at column 200 (windows 0 and 144)
    source, probs, class_path, prob_path, refined_path = _coarse_scene_files(tmp_path, truth)
    stats = refine_with_sam(sam, source, PixelWindow(0, 0, size, size), class_path, prob_path,
                            refined_path, SamSettings(), mask_predictor=_box_masks)
    assert stats.windows == 4 and stats.kept >= 2
    objects = [r for r in vectorize_class_raster(refined_path) if r.class_id == 1]
    assert len(objects) == 1
    with rasterio.open(refined_path) as ds:
        refined = ds.read(1)
    coarse_iou = ((probs.argmax(0) == 1) & (truth == 1)).sum() / ((probs.argmax(0) == 1) | (truth == 1)).sum()
    refined_iou = ((refined == 1) & (truth == 1)).sum() / ((refined == 1) | (truth == 1)).sum()
    assert refined_iou > coarse_iou


def test_sam_refinement_memory_does_not_grow_with_the_raster(tmp_path, tiny_sam):
    sam = load_sam(str(tiny_sam))
    peaks = {}
    for size in (320, 832):                       # 4 and 16 SAM windows
        truth = np.zeros((size, size), np.uint8)
        for top in range(30, size - 60, 110):
            for left in range(30, size - 60, 110):
                truth[top:top + 48, left:left + 48] = 1   # houses in every window
        folder = tmp_path / str(size)
        folder.mkdir()
        source, _, class_path, prob_path, refined_path = _coarse_scene_files(folder, truth)
        tracemalloc.start()
        stats = refine_with_sam(sam, source, PixelWindow(0, 0, size, size), class_path, prob_path, refined_path)
        peaks[size] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.prompts > 0
    assert peaks[832] < 1.5 * peaks[320], peaks  # 6.8x the pixels, same peak: one window at a time


def test_refine_sam_writes_objects_with_ids_and_warns_on_coarse_pixels(tmp_path, shared_data, tiny_clip, tiny_sam):
    out = tmp_path / "landsat.gpkg"
    result = segment(shared_data / "RGB.byte.tif", "-c", "water", "-c", "land", "--model", tiny_clip,
                     "--refine", "sam", "--sam-model", tiny_sam, "--scale", "0.4", "--out", out,
                     "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert "750.1 m wide" in result.output and "window of 256 px" in result.output
    assert "--refine edges" in result.output
    meta, _, geometry, fields = pyogrio.raw.read(out)
    names = list(meta["fields"])
    assert "object_id" in names and "class" in names
    ids = fields[names.index("object_id")]
    assert len(ids) == len(geometry) and len(set(ids.tolist())) == len(ids)
    assert "32618" in meta["crs"]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["sam"]["windows"] == 4 and report["sam"]["embed_s_per_window"] > 0
    assert report["sam"]["prompts"] == report["sam"]["kept"] + report["sam"]["dropped"]


def test_refine_sam_rasters_and_polygons_obey_the_threshold_and_the_class_map(tmp_path, tiny_clip, tiny_sam,
                                                                           monkeypatch):
    monkeypatch.setattr(sam_module, "predict_masks", _box_masks)   # masks that grow over their neighbours
    threshold = 0.4
    out = tmp_path / "naip.gpkg"
    result = segment(SAMPLE, "-c", "water", "-c", "crop field", "-c", "road", "--model", tiny_clip,
                     "--refine", "sam", "--sam-model", tiny_sam, "--threshold", threshold, "--out", out,
                     "--class-raster", tmp_path / "c.tif", "--prob-raster", tmp_path / "p.tif",
                     "--runtime", "torch", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["sam"]["kept"] > 0
    with rasterio.open(tmp_path / "c.tif") as class_ds, rasterio.open(tmp_path / "p.tif") as prob_ds:
        classes, probs, transform = class_ds.read(1), prob_ds.read(), class_ds.transform
    classified = classes < probs.shape[0]
    own = np.take_along_axis(probs, np.minimum(classes, probs.shape[0] - 1)[None].astype(np.intp), 0)[0]
    unclassified = classes == UNCLASSIFIED
    # The probability raster is the class map's; SAM gives a pixel no class below the threshold, and
    # none more than the margin below the pixel's most probable class.
    assert (own[classified] >= threshold).all()
    assert unclassified.any() and (probs.max(axis=0)[unclassified] < threshold).all()
    assert ((probs.max(axis=0) < threshold) == unclassified).all()
    assert (probs.max(axis=0) - own)[classified].max() <= SamSettings.margin + 1e-6
    # Each polygon's scores are the probabilities of its own class.
    meta, _, geometry, fields = pyogrio.raw.read(out)
    names = list(meta["fields"])
    polygons = shapely.from_wkb(geometry)
    index = rasterize(((polygon, i) for i, polygon in enumerate(polygons)), out_shape=classes.shape,
                      transform=transform, fill=-1, dtype="int32")
    for i, class_id in enumerate(fields[names.index("class_id")]):
        scores = own[(index == i) & (classes == class_id)]
        assert fields[names.index("score_max")][i] == pytest.approx(scores.max(), abs=1e-5)
        assert fields[names.index("score_mean")][i] == pytest.approx(scores.mean(), abs=1e-4)


def test_refine_sam_without_sam_weights_names_the_file(tmp_path, shared_data, tiny_clip, monkeypatch):
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path / "weights"))
    result = segment(shared_data / "solaris_sample_geotiff.tif", "-c", "building", "--model", tiny_clip,
                     "--refine", "sam", "--out", tmp_path / "x.gpkg", "--device", "cpu", "-q")
    assert result.exit_code == 3
    assert "model.safetensors" in result.output and "facebook/sam-vit-base" in result.output
    assert "--sam-model PATH" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.gpkg").exists()


def test_coarse_resolution_warning_only_above_ten_metres():
    assert coarse_resolution_warning(0.5) is None and coarse_resolution_warning(10.0) is None
    assert "30.0 m wide" in coarse_resolution_warning(30.0) and "spans 31 km" in coarse_resolution_warning(30.0)
