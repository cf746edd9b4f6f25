"""FarSLIP's fine-tuning losses (FARSLIP_METHOD.md section 6) plus a dense patch loss.

- `patch_distillation_loss`: stage 1 patch-to-patch self-distillation: the
  student's dense map RoI-aligned inside a box and mean-pooled, against the
  teacher's mean dense token of that box cropped and resized (1 - cosine).
- `region_alignment_loss`: stage 2 region-category alignment: region CLS
  embeddings against category texts, multi-positive contrastive.
- `patch_label_loss`: the project's addition for dense GIS labels:
  cross-entropy of the patch-text logits against rasterised labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IGNORE = -1


def patch_targets(labels: torch.Tensor, patch: int, num_classes: int,
                  min_labelled: float = 0.5) -> torch.Tensor:
    """(B, H, W) pixel labels (-1 unlabelled) -> (B, H/p, W/p) patch labels by area majority.

    A patch whose labelled pixels cover less than `min_labelled` of it is ignored (-1).
    """
    labelled = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0).long(), num_classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * labelled[:, None].float()
    area = F.avg_pool2d(one_hot, patch)                     # (B, C, h, w) class fractions
    fraction, target = area.max(dim=1)
    covered = area.sum(dim=1)
    target[(covered < min_labelled) | (fraction <= 0)] = IGNORE
    return target


def class_log_probs(features: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_classes: int,
                    logit_scale: float) -> torch.Tensor:
    """(..., D) features, (Q, D) query texts -> (..., C) log-probabilities of the classes.

    Softmax over queries as in inference; a class's probability is the sum over
    its synonyms (a smooth stand-in for the engine's max, exact for one query).
    """
    logits = logit_scale * features @ text.t()
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if len(owner) == num_classes:
        return log_probs
    out = torch.full((*log_probs.shape[:-1], num_classes), float("-inf"), device=log_probs.device)
    for class_id in range(num_classes):
        out[..., class_id] = torch.logsumexp(log_probs[..., owner == class_id], dim=-1)
    return out


def patch_label_loss(features: torch.Tensor, text: torch.Tensor, owner: torch.Tensor,
                     targets: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Cross-entropy of (B, h, w, D) dense features against (B, h, w) patch targets."""
    keep = targets >= 0
    if not keep.any():
        return features.sum() * 0.0
    num_classes = int(owner.max().item()) + 1
    log_probs = class_log_probs(features[keep], text, owner, num_classes, logit_scale)
    return F.nll_loss(log_probs, targets[keep].long())


def pooled_roi_features(dense: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean of the RoI-aligned dense map in each box.

    dense: (B, h, w, D) patch features; boxes: (K, 5) rows (image index, x0, y0, x1, y1) in
    patch-grid units. The RoI output size is the grid size, as in FarSLIP.
    """
    grid = dense.shape[1:3]
    feature_map = dense.permute(0, 3, 1, 2)
    pooled = roi_align(feature_map, boxes.to(feature_map.dtype), output_size=grid, spatial_scale=1.0,
                       sampling_ratio=2, aligned=True)
    return pooled.mean(dim=(2, 3))


def patch_distillation_loss(student_dense: torch.Tensor, boxes: torch.Tensor,
                            teacher_pooled: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the student's RoI-pooled box features and the teacher's box features."""
    student = pooled_roi_features(student_dense, boxes)
    return (1.0 - F.cosine_similarity(student.float(), teacher_pooled.float(), dim=-1)).mean()


def region_alignment_loss(region_embeddings: torch.Tensor, region_classes: torch.Tensor,
                          class_text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Multi-positive contrastive loss between regions and category texts.

    Region -> text: softmax over the categories, one positive. Text -> region: for
    each category present, every region of that category is a positive (mean of
    their log-probabilities over the regions of the batch). The two are averaged.
    """
    regions = F.normalize(region_embeddings.float(), dim=-1)
    texts = F.normalize(class_text.float(), dim=-1)
    logits = logit_scale * regions @ texts.t()                      # (R, C)
    region_to_text = F.cross_entropy(logits, region_classes.long())
    present = torch.unique(region_classes)
    log_probs = torch.log_softmax(logits[:, present].t(), dim=-1)   # (P, R) over regions
    positives = (region_classes[None, :] == present[:, None]).float()
    text_to_region = -((log_probs * positives).sum(dim=1) / positives.sum(dim=1)).mean()
    return (region_to_text + text_to_region) / 2
