"""The tiled, streaming engine computes exactly FARSLIP_METHOD.md section 4."""

import math
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from tinymodels import make_tiny_clip

from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.sliding import ArraySource, Segmenter, _blended_rows, _CropRow, crop_starts, predict_window
from backend.engine.raster import PixelWindow
from backend.engine.presets import parse_class_lines

CLASS_LINES = ["water, lake", "cropland, bare field", "grassland"]


def _loaded(patch_size):
    return SimpleNamespace(model=make_tiny_clip(patch_size), tokenizer=open_clip.get_tokenizer("ViT-B-16"),
                           device=torch.device("cpu"), weights_id=f"tiny-b{patch_size}" + "0" * 40,
                           context_length=77, metadata={})


def reference_probabilities(model, text, owner, image):
    """Plain section 4: slide 224 crops with stride 112 over the whole image, one crop at a time."""
    _, height, width = image.shape
    crop, stride = 224, 112
    patch = model.visual.conv1.kernel_size[0]
    acc = torch.zeros(text.shape[0], height, width)
    count = torch.zeros(height, width)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            img = normalize_pixels(torch.from_numpy(image[None, :, y1:y2, x1:x2].copy()))
            h, w = img.shape[-2:]
            pad_h, pad_w = (-h) % patch, (-w) % patch
            img = F.pad(img, (0, pad_w, 0, pad_h))
            with torch.no_grad():
                feats = dense_patch_features(model.visual, img)
            logits = (feats[0] @ text.T).permute(2, 0, 1)[None]
            logits = F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)
            acc[:, y1:y2, x1:x2] += logits[0, :, :h, :w]
            count[y1:y2, x1:x2] += 1
    probs = torch.softmax(acc / count * 50, dim=0)
    owner = torch.tensor(owner)
    return torch.stack([probs[owner == c].max(dim=0).values for c in range(int(owner.max()) + 1)]).numpy()


@pytest.mark.parametrize("patch_size", [16, 32])
@pytest.mark.parametrize("shape", [(300, 470), (224, 224), (150, 260)])
def test_tiled_engine_matches_plain_sliding_window(patch_size, shape, tmp_path):
    loaded = _loaded(patch_size)
    segmenter = Segmenter(loaded, parse_class_lines(CLASS_LINES), batch_size=3)
    image = np.random.default_rng(1).uniform(0, 255, (3, *shape)).astype(np.float32)
    got = predict_window(segmenter, ArraySource(image), chunk_columns=224)
    expected = reference_probabilities(loaded.model, segmenter.text, segmenter.owner, image)
    assert got.probs.shape == expected.shape
    assert np.abs(got.probs - expected).max() < 1e-4
    assert (got.class_ids == expected.argmax(axis=0)).mean() > 0.999


def test_two_overlapping_bboxes_give_identical_probabilities():
    segmenter = Segmenter(_loaded(16), parse_class_lines(CLASS_LINES), batch_size=5)
    image = np.random.default_rng(2).uniform(0, 255, (3, 640, 700)).astype(np.float32)
    source = ArraySource(image)
    a = PixelWindow(37, 51, 400, 390)
    b = PixelWindow(201, 190, 439, 510)
    got_a = predict_window(segmenter, source, a).probs
    got_b = predict_window(segmenter, source, b, chunk_columns=160).probs
    rows = slice(max(a.row_off, b.row_off), min(a.row_off + a.height, b.row_off + b.height))
    cols = slice(max(a.col_off, b.col_off), min(a.col_off + a.width, b.col_off + b.width))
    pa = got_a[:, rows.start - a.row_off:rows.stop - a.row_off, cols.start - a.col_off:cols.stop - a.col_off]
    pb = got_b[:, rows.start - b.row_off:rows.stop - b.row_off, cols.start - b.col_off:cols.stop - b.col_off]
    assert pa.size > 0
    np.testing.assert_allclose(pa, pb, atol=1e-6)


def test_each_work_unit_alone_gives_bit_identical_values():
    """The engine's units (column chunks x row bands) are computed on their own, so a unit computed by
    itself (as a Ray worker does, backend/scale) equals the same pixels of the whole window exactly."""
    from backend.engine.sliding import units

    segmenter = Segmenter(_loaded(16), parse_class_lines(CLASS_LINES), batch_size=5)
    image = np.random.default_rng(4).uniform(0, 255, (3, 700, 610)).astype(np.float32)
    valid = np.ones((700, 610), bool)
    valid[:300, :200] = False  # skipped crops must not shift a unit's batches either
    source = ArraySource(image, valid)
    window = PixelWindow(0, 0, 700, 610)
    whole = predict_window(segmenter, source, window, chunk_rows=336, chunk_columns=224)
    found = units(window, 336, 224)
    assert len(found) == 9
    for unit in found:
        alone = predict_window(segmenter, source, unit, chunk_rows=336, chunk_columns=224)
        assert np.array_equal(alone.probs, whole.probs[:, unit.rows, unit.cols], equal_nan=True), unit
        assert np.array_equal(alone.class_ids, whole.class_ids[unit.rows, unit.cols]), unit


def test_masked_pixels_get_no_class_and_fully_masked_crops_are_skipped():
    segmenter = Segmenter(_loaded(16), parse_class_lines(CLASS_LINES), batch_size=4)
    image = np.random.default_rng(3).uniform(0, 255, (3, 500, 500)).astype(np.float32)
    valid = np.ones((500, 500), bool)
    valid[:, :260] = False
    calls = []
    got = predict_window(segmenter, ArraySource(image, valid), progress=lambda done, total: calls.append(done))
    assert (got.class_ids[:, :260] == 255).all()
    assert np.isnan(got.probs[:, :, :260]).all()
    assert (got.class_ids[:, 260:] < 3).all()
    assert calls[0] == 0 and calls == sorted(calls)
    assert calls[-1] == len(crop_starts(500, 224, 112)) ** 2
    blacked = image.copy()
    blacked[:, ~valid] = 0
    full = predict_window(segmenter, ArraySource(blacked))
    # Skipping crops that cover only masked pixels changes no valid pixel.
    np.testing.assert_allclose(got.probs[:, :, 260:], full.probs[:, :, 260:], atol=1e-6)


def test_rows_no_crop_reaches_hold_nothing_and_the_rows_around_them_match_the_reference():
    """A band of masked rows taller than a crop and a half: whole crop rows are skipped, some rows are
    reached by no crop at all, and crop rows are opened and forgotten many times over the height.
    The valid rows equal plain section 4 on the image with the band blacked out; the unreached rows
    carry no logits (0) and no class."""
    segmenter = Segmenter(_loaded(16), parse_class_lines(CLASS_LINES), batch_size=3)
    segmenter.keep_logits = True
    image = np.random.default_rng(5).uniform(0, 255, (3, 1200, 300)).astype(np.float32)
    valid = np.ones((1200, 300), bool)
    valid[400:900] = False
    got = predict_window(segmenter, ArraySource(image, valid))
    blacked = image.copy()
    blacked[:, ~valid] = 0
    expected = reference_probabilities(segmenter.loaded.model, segmenter.text, segmenter.owner, blacked)
    assert np.abs(got.probs[:, valid] - expected[:, valid]).max() < 1e-4
    assert (got.class_ids[~valid] == 255).all() and np.isnan(got.probs[:, ~valid]).all()
    unreached = slice(560, 784)  # only the crop rows at 448, 560 and 672 reach these, all fully masked
    assert got.logits is not None and (got.logits[:, unreached] == 0).all()


def test_crop_grid_follows_the_reference_formula():
    assert crop_starts(448, 224, 112) == [0, 112, 224]
    assert crop_starts(500, 224, 112) == [0, 112, 224, 276]
    assert crop_starts(100, 224, 112) == [0]


@pytest.mark.parametrize("stride", [3, 5, 8])
def test_blended_rows_equal_the_sum_over_covering_crop_rows_divided_by_their_crops(stride):
    """Crop rows of height 8 at `stride` (three deep, two deep, touching), some skipped whole (no band),
    with random bands and column counts (zero in places); rows asked for in uneven pieces. Each row is
    the sum over the crop rows covering it of down-weights @ band, divided by their crops per column;
    valid where a crop row read it valid and some crop reached it; zero logits where none did."""
    rng = np.random.default_rng(stride)
    height, grid, queries, width = 8, 4, 2, 5
    down = torch.from_numpy(rng.normal(size=(height, grid)).astype(np.float32))
    rows = []
    for i, top in enumerate(range(0, 40, stride)):
        valid = rng.random((height, width)) > 0.2
        row = _CropRow(top, valid)
        if i % 4 != 2:
            row.band = torch.from_numpy(rng.normal(size=(queries, grid, width)).astype(np.float32))
            row.columns = rng.integers(0, 3, width).astype(np.float32)
        rows.append(row)
    end = rows[-1].top + height
    expected = np.zeros((queries, end, width), np.float32)
    count = np.zeros((end, width), np.float32)
    read_valid = np.zeros((end, width), bool)
    for row in rows:
        read_valid[row.top:row.top + height] = row.valid
        if row.band is not None:
            expected[:, row.top:row.top + height] += (down @ row.band).numpy()
            count[row.top:row.top + height] += row.columns
    expected /= np.maximum(count, 1)
    first = 0
    while first < end:
        stop = min(end, first + int(rng.integers(1, 7)))
        out = torch.full((queries, stop - first, width), math.nan)
        valid = _blended_rows(rows, down, first, stop, out)
        np.testing.assert_allclose(out.numpy(), expected[:, first:stop], rtol=1e-5, atol=1e-5)
        assert np.array_equal(valid, read_valid[first:stop] & (count[first:stop] > 0))
        first = stop
    assert (count == 0).any() and (count > 0).any()


@pytest.mark.parametrize("class_lines", [CLASS_LINES, ["water", "cropland", "grassland"]])
def test_blocks_kept_by_the_caller_are_not_overwritten_by_later_blocks(class_lines):
    """The finishing step reuses its (queries, rows, width) temporaries from crop row to crop row; the
    blocks it hands out (probabilities, classes, scores, signals, logits) stay the caller's: kept
    until the run ends, each still holds what it held when it came, with and without synonyms."""
    from backend.engine.sliding import predict_blocks

    segmenter = Segmenter(_loaded(16), parse_class_lines(class_lines), batch_size=3)
    segmenter.keep_logits = True
    image = np.random.default_rng(8).uniform(0, 255, (3, 600, 300)).astype(np.float32)
    kept, copies = [], []
    for block in predict_blocks(segmenter, ArraySource(image), PixelWindow(0, 0, 600, 300)):
        kept.append(block)
        copies.append([np.copy(a) for a in (block.probs, block.class_ids, block.score, block.signals, block.logits)])
    assert len(kept) >= 4
    for block, copy in zip(kept, copies):
        for now, then in zip((block.probs, block.class_ids, block.score, block.signals, block.logits), copy):
            assert np.array_equal(now, then, equal_nan=True)
    whole = predict_window(segmenter, ArraySource(image))
    for block in kept:
        rows = slice(block.row0, block.row0 + block.class_ids.shape[0])
        assert np.array_equal(block.probs, whole.probs[:, rows], equal_nan=True)


@pytest.mark.parametrize("class_lines", [CLASS_LINES, ["water", "cropland", "grassland"]])
def test_blocks_without_probabilities_carry_the_same_classes_scores_and_signals(class_lines):
    """A run that writes no probability raster keeps none (`keep_probs` off, as `segment` sets it): its
    blocks' classes, scores and signals are bit for bit those of a run that keeps them, with and without
    synonyms and with nodata, and blocks kept by the caller are not overwritten by the reused buffer."""
    from backend.engine.sliding import predict_blocks

    image = np.random.default_rng(9).uniform(0, 255, (3, 600, 300)).astype(np.float32)
    valid = np.ones((600, 300), bool)
    valid[100:180, :40] = False
    source = ArraySource(image, valid)
    window = PixelWindow(0, 0, 600, 300)
    runs = {}
    for keep in (True, False):
        segmenter = Segmenter(_loaded(16), parse_class_lines(class_lines), batch_size=3)
        segmenter.keep_probs = keep
        runs[keep] = list(predict_blocks(segmenter, source, window))
    assert len(runs[False]) == len(runs[True]) >= 4
    for lean, full in zip(runs[False], runs[True]):
        assert lean.probs is None and full.probs is not None
        for a, b in ((lean.class_ids, full.class_ids), (lean.score, full.score), (lean.signals, full.signals)):
            assert np.array_equal(a, b, equal_nan=True)
    assert (runs[False][1].class_ids == 255).any()  # the nodata rows came through


def test_blocks_come_in_order_and_a_failure_in_the_finisher_thread_reaches_the_caller():
    """The finishing step runs in a thread of its own: its blocks still come in row order without gaps,
    an error raised there stops the run where the caller reads the blocks, and no thread is left behind."""
    import threading

    from backend.engine.sliding import predict_blocks

    segmenter = Segmenter(_loaded(16), parse_class_lines(CLASS_LINES), batch_size=3)
    image = np.random.default_rng(3).uniform(0, 255, (3, 600, 300)).astype(np.float32)
    rows = [(block.row0, len(block.class_ids)) for block in predict_blocks(segmenter, ArraySource(image),
                                                                            PixelWindow(0, 0, 600, 300))]
    assert len(rows) >= 4 and rows[0][0] == 0 and sum(height for _, height in rows) == 600
    assert all(row0 + height == next_row0 for (row0, height), (next_row0, _) in zip(rows, rows[1:]))

    finish, calls = segmenter.finish, []

    def failing(*args):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("out of memory in the finishing step")
        return finish(*args)

    segmenter.finish = failing
    received = []
    with pytest.raises(RuntimeError, match="finishing step"):
        for block in predict_blocks(segmenter, ArraySource(image), PixelWindow(0, 0, 600, 300)):
            received.append(block.row0)
    assert received == [row0 for row0, _ in rows[:2]]
    assert all(name.startswith("farslip-finish") for name in calls)
    assert not any(thread.name.startswith("farslip-finish") for thread in threading.enumerate())


def test_the_engine_s_own_ops_run_on_one_thread_and_the_encoder_and_caller_keep_theirs():
    """Crops go through the encoder with the intra-op threads the caller had; blending and finishing
    run on one thread each (HOST_OP_THREADS); the caller's code between blocks, the caller after the
    run and a thread started after it all still have the caller's count (a server's next job too)."""
    import threading

    from backend.engine.sliding import HOST_OP_THREADS, predict_blocks

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        segmenter = Segmenter(_loaded(16), parse_class_lines(CLASS_LINES), batch_size=3)
        encoder, finish, seen = segmenter.encoder, segmenter.finish, {"encoder": set(), "finish": set()}

        def counting_encoder(pixels):
            seen["encoder"].add(torch.get_num_threads())
            return encoder(pixels)

        def counting_finish(*args):
            seen["finish"].add(torch.get_num_threads())
            return finish(*args)

        segmenter.encoder, segmenter.finish = counting_encoder, counting_finish
        image = np.random.default_rng(5).uniform(0, 255, (3, 500, 300)).astype(np.float32)
        between = set()
        for _ in predict_blocks(segmenter, ArraySource(image), PixelWindow(0, 0, 500, 300)):
            between.add(torch.get_num_threads())
        assert seen == {"encoder": {3}, "finish": {HOST_OP_THREADS}}
        assert between == {3} and torch.get_num_threads() == 3
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [3]
    finally:
        torch.set_num_threads(before)
