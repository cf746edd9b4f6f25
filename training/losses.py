"""FarSLIP's fine-tuning losses (FARSLIP_METHOD.md section 6) plus a dense patch loss.

- `patch_distillation_loss`: stage 1 patch-to-patch self-distillation: the
  student's unnormalised projected tokens of a global view RoI-aligned inside a
  box and mean-pooled, against the teacher's mean token of that box read at
  native resolution and resized (1 - cosine).
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
    """(B, H, W) pixel labels (-1 unlabelled) -> (B, h, w, C) class area fractions per patch.

    Fractions are of the patch's labelled pixels, so a patch half building, half
    ground teaches both (objects smaller than a patch still count); a patch whose
    labelled pixels cover less than `min_labelled` of it gets all zeros (ignored).
    """
    labelled = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0).long(), num_classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * labelled[:, None].float()
    area = F.avg_pool2d(one_hot, patch)                     # (B, C, h, w)
    covered = area.sum(dim=1, keepdim=True)
    fractions = torch.where(covered >= min_labelled, area / covered.clamp(min=1e-6), torch.zeros_like(area))
    return fractions.permute(0, 2, 3, 1)


def majority(fractions: torch.Tensor) -> torch.Tensor:
    """(..., C) fractions -> (...) class of the largest fraction, -1 where the patch is ignored."""
    share, target = fractions.max(dim=-1)
    return torch.where(share > 0, target, torch.full_like(target, IGNORE))


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
                     targets: torch.Tensor, logit_scale: float,
                     class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (B, h, w, D) dense features against (B, h, w, C) patch class fractions.

    Soft targets (area fractions); each patch weighted by its classes' weights; patches
    with all-zero targets are ignored.
    """
    keep = targets.sum(dim=-1) > 0
    if not keep.any():
        return features.sum() * 0.0
    soft = targets[keep]
    log_probs = class_log_probs(features[keep], text, owner, soft.shape[-1], logit_scale)
    per_patch = -(soft * log_probs.clamp(min=-1e4)).sum(dim=-1)
    if class_weights is None:
        return per_patch.mean()
    weights = soft @ class_weights
    return (weights * per_patch).sum() / weights.sum().clamp(min=1e-6)


def balanced_class_weights(pixel_counts: list[int], power: float = 0.5) -> torch.Tensor:
    """Weights ~ frequency^-power, mean 1 over present classes (rare classes such as buildings
    against a large background would otherwise be predicted as the background everywhere)."""
    counts = torch.tensor(pixel_counts, dtype=torch.float32)
    weights = torch.where(counts > 0, counts.clamp(min=1) ** -power, torch.zeros_like(counts))
    present = counts > 0
    return weights / weights[present].mean()


def pooled_roi_features(dense: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean of the RoI-aligned dense map in each box.

    dense: (B, h, w, D) patch features; boxes: (K, 5) rows (image index, x0, y0, x1, y1) in
    patch-grid units. The RoI output size is the grid size, as in FarSLIP.
    """
    grid = dense.shape[1:3]
    feature_map = dense.permute(0, 3, 1, 2)
    pooled = roi_align(feature_map, boxes.to(feature_map.dtype), output_size=grid, spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True)
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
