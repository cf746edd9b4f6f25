"""FarSLIP's local-to-global distillation as the release does it: RandomResizedCrop boxes, the teacher's
view read at native resolution, frozen or active teacher recorded with the model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain
from training_data import fast_options

from backend.engine.models import load_model
from backend.engine.raster import PixelWindow, open_source
from training.api import train_model
from training.distill import BOX_ASPECT, draw_box, native_area, native_source, resize_square, sample_views


def test_distillation_boxes_follow_random_resized_crop_statistics():
    rng = np.random.default_rng(0)
    side = 448
    boxes = np.array([draw_box(side, side, rng) for _ in range(3000)])
    top, left, h, w = boxes.T
    area = h * w / side**2
    aspect = w / h
    assert abs(area.mean() - 0.5) < 0.03
    assert area.min() > 0.29 and area.max() < 0.71
    assert aspect.min() >= BOX_ASPECT[0] - 0.01 and aspect.max() <= BOX_ASPECT[1] + 0.01
    assert abs(np.log(aspect).mean()) < 0.02  # log-uniform: as many wide boxes as tall ones
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    again = np.random.default_rng(0)
    assert [draw_box(side, side, again) for _ in range(5)] == [tuple(b) for b in boxes[:5].tolist()]


@pytest.fixture(scope="module")
def fine_raster(tmp_path_factory):
    """A 1000 x 1000 raster at 0.5 m whose detail (4 px stripes + noise) only the native pixels hold."""
    rng = np.random.default_rng(1)
    cols = np.arange(1000)
    stripes = np.where((cols // 2) % 2 == 0, 60, 190)[None, :].repeat(1000, axis=0)
    rgb = np.clip(stripes[None] + rng.normal(0, 20, (3, 1000, 1000)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("fine") / "fine.tif"
    with rasterio.open(path, "w", driver="GTiff", width=1000, height=1000, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.5, 0.5)) as ds:
        ds.write(rgb)
    return path


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_teacher_views_are_read_at_native_resolution(fine_raster, scale):
    with open_source(fine_raster, scale=scale) as source:
        window = PixelWindow(0, 0, source.height, source.width)
        native = native_source(source)
        area = native_area(source, window)
        assert (area.height, area.width) == (1000, 1000)
        views = sample_views(native, area, 224, 2, 3, np.random.default_rng(2))
        assert views.native_px == 448 and views.detail == 2.0  # global views 2x coarser than native
        assert views.global_pixels.shape == (2, 3, 224, 224) and views.local_pixels.shape == (6, 3, 224, 224)
        for k, (index, x0, y0, x1, y1) in enumerate(views.boxes.tolist()):
            row, col = views.origins[int(index)]
            # The box in native pixels (view pixels x 2), read from the raster, resized to 224.
            top, left, bottom, right = (round(v * views.detail) for v in (y0, x0, y1, x1))
            rgb, _ = native.read(PixelWindow(row + top, col + left, bottom - top, right - left))
            expected = resize_square(torch.from_numpy(rgb)[None], 224)[0]
            torch.testing.assert_close(views.local_pixels[k], expected)
            # Cut from the global view instead (the old way), the stripes would be blurred away.
            from_global = resize_square(views.global_pixels[int(index):int(index) + 1, :, math.floor(y0):math.ceil(y1),
                                                            math.floor(x0):math.ceil(x1)], 224)[0]
            assert expected.std() > from_global.std() * 1.3


def test_active_teacher_and_gelu_base_are_recorded_and_reloaded(synthetic, tmp_path):
    raster, labels, _ = synthetic
    base = save_plain(make_tiny_clip(patch_size=32, quick_gelu=False, seed=5), tmp_path / "RS5M_ViT-B-32.pt")
    out = tmp_path / "active"
    result = train_model(raster, labels, "cls", out, base_model=str(base), epochs=1, lr=1e-3,
                         options=fast_options(teacher="active", steps_per_epoch=2))
    meta = json.loads((out / "farslip_model.json").read_text())
    assert meta["distillation"]["teacher"] == "active" and meta["training"]["teacher"] == "active"
    assert meta["distillation"]["box_area"] == [0.3, 0.7]
    assert meta["activation"] == "gelu"
    assert result["history"][0]["losses"]["distill"] > 0
    assert load_model(str(out)).metadata["activation"] == "gelu"
    with pytest.raises(Exception, match="--teacher must be frozen"):
        train_model(raster, labels, "cls", tmp_path / "bad", base_model=str(base), epochs=1,
                    options=fast_options(teacher="ema"))
