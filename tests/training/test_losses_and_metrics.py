"""Losses, adapters and metrics as pure functions."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from tinymodels import make_tiny_clip

from backend.engine.dense import dense_patch_features
from training import adapters
from training.evaluate import confusion_matrix, format_metrics, metrics_from_confusion, plot_confusion
from training.losses import (
    balanced_class_weights,
    majority,
    patch_distillation_loss,
    patch_label_loss,
    patch_targets,
    pooled_roi_features,
    region_alignment_loss,
)


def test_patch_targets_are_area_fractions_and_ignore_unlabelled_patches():
    labels = torch.full((1, 32, 32), -1)
    labels[0, :16, :16] = 1
    labels[0, :16, :4] = 0          # patch (0,0): 1/4 class 0, 3/4 class 1
    labels[0, 16:, 16:20] = 2       # patch (1,1): 25 % labelled -> ignored
    labels[0, :16, 16:] = 0
    fractions = patch_targets(labels, 16, 3)
    assert torch.allclose(fractions[0, 0, 0], torch.tensor([0.25, 0.75, 0.0]))
    assert torch.allclose(fractions[0, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert fractions[0, 1].sum() == 0
    assert majority(fractions).tolist() == [[[1, 0], [-1, -1]]]


def one_hot_targets(classes: list[list[int]]) -> torch.Tensor:
    tensor = torch.tensor(classes)
    return F.one_hot(tensor.clamp(min=0), 3).float() * (tensor >= 0)[..., None]


def test_patch_label_loss_prefers_the_right_class():
    text = F.normalize(torch.eye(3, 8), dim=-1)
    features = text[[0, 1, 2, 0]].reshape(1, 2, 2, 8)
    owner = torch.tensor([0, 1, 2])
    right = patch_label_loss(features, text, owner, one_hot_targets([[[0, 1], [2, 0]]]), 50.0)
    wrong = patch_label_loss(features, text, owner, one_hot_targets([[[1, 2], [0, -1]]]), 50.0)
    assert right < 0.01 < wrong
    weights = balanced_class_weights([100, 1, 0])
    assert weights[1] > weights[0] and weights[2] == 0
    weighted = patch_label_loss(features, text, owner, one_hot_targets([[[1, 2], [0, -1]]]), 50.0, weights)
    assert torch.isfinite(weighted)


def test_synonyms_share_their_class_probability():
    text = F.normalize(torch.eye(3, 8), dim=-1)
    owner = torch.tensor([0, 0, 1])      # class 0 = queries 0 and 1
    features = text[[1]].reshape(1, 1, 1, 8)
    targets = torch.tensor([[[[1.0, 0.0]]]])
    assert patch_label_loss(features, text, owner, targets, 50.0) < 0.01


def test_roi_pooling_of_a_constant_map_gives_the_constant():
    dense = torch.ones(1, 4, 4, 3)
    boxes = torch.tensor([[0, 0.5, 0.5, 3.0, 2.0]])
    assert torch.allclose(pooled_roi_features(dense, boxes), torch.ones(1, 3))
    assert patch_distillation_loss(dense, boxes, torch.ones(1, 3)) < 1e-6


def test_region_alignment_rewards_matching_regions():
    text = F.normalize(torch.randn(3, 16), dim=-1)
    classes = torch.tensor([0, 0, 1, 2])
    aligned = region_alignment_loss(text[classes], classes, text, 50.0)
    shuffled = region_alignment_loss(text[torch.tensor([1, 2, 0, 0])], classes, text, 50.0)
    assert aligned < shuffled


def test_lora_merges_into_a_plain_state_dict_with_the_same_outputs():
    model = make_tiny_clip()
    pixels = torch.randn(1, 3, 224, 224)
    base = dense_patch_features(model.visual, pixels)
    parameters = adapters.prepare(model, "lora", rank=4)
    assert parameters and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(dense_patch_features(model.visual, pixels), base)   # B starts at zero
    with torch.no_grad():
        for p in parameters:
            p.add_(0.05 * torch.randn_like(p))
    tuned = dense_patch_features(model.visual, pixels)
    assert not torch.allclose(tuned, base)
    plain = make_tiny_clip(seed=1)
    plain.load_state_dict(adapters.merged_state_dict(model))
    assert torch.allclose(dense_patch_features(plain.visual, pixels), tuned, atol=1e-5)
    adapters.set_adapters_enabled(model, False)
    assert torch.allclose(dense_patch_features(model.visual, pixels), base, atol=1e-6)


def test_last_blocks_unfreezes_only_the_top_of_the_vision_tower():
    model = make_tiny_clip()
    adapters.prepare(model, "last-blocks", last_blocks=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "visual.ln_post.weight" in trainable
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.0.") or not n.startswith("visual.")
                   for n in trainable)


def test_metrics_follow_the_iou_definition(tmp_path):
    truth = np.array([0, 0, 1, 1, 2, -1])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    confusion = confusion_matrix(truth, predicted, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    metrics = metrics_from_confusion(confusion, ["a", "b", "c"])
    ious = [c["iou"] for c in metrics["classes"]]
    assert ious == [1 / 3, 2 / 3, 0.0] or np.allclose(ious, [1 / 3, 2 / 3, 0.0])
    assert np.isclose(metrics["miou"], 1 / 3)
    assert np.isclose(metrics["pixel_accuracy"], 3 / 5)
    json.dumps(metrics, allow_nan=False)
    text = format_metrics(metrics)
    assert "mIoU" in text and "33.33" in text and "confusion matrix" in text
    png = plot_confusion(metrics, tmp_path / "cm.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_class_absent_from_truth_and_prediction_does_not_count():
    metrics = metrics_from_confusion(np.array([[3, 0, 0], [0, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert metrics["classes"][2]["iou"] is None and metrics["miou"] == 1.0


def test_a_confusion_picture_of_class_names_in_any_script_prints_no_glyph_warnings(tmp_path):
    """Training on CJK class names printed matplotlib's 'Glyph ... missing from font(s)' once per character."""
    import warnings

    from training.evaluate import draw_confusion

    metrics = {"confusion": [[5, 1], [2, 7]], "class_names": ["水体", "건물"], "miou": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw_confusion(metrics, tmp_path / "matrix.png")
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
