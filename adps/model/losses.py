"""Losses: mask-aware cosine distillation (Eq. 7) and focal segmentation loss (Eq. 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def level_mask(mask: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(B, 1, H, W) mask -> (B, h, w) in {0, 1}: bilinear resize, then threshold."""
    resized = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    return (resized[:, 0] > threshold).float()


def distillation_loss(
    teacher_feats: list[torch.Tensor],
    student_feats: list[torch.Tensor],
    mask: torch.Tensor,
    push_weight: float,
    push_floor: float | None,
    mask_threshold: float,
) -> torch.Tensor:
    """Sum over levels of mean[(1 - Y)(1 - cos) + push_weight * Y * max(cos, floor)].

    Pulls teacher and student together on normal positions and pushes them apart on anomalous
    ones. ``push_floor=None`` is the paper's unfloored push term ``Y * cos``.
    """
    total = teacher_feats[0].new_zeros(())
    for t, s in zip(teacher_feats, student_feats, strict=True):
        cos = F.cosine_similarity(t, s, dim=1)
        y = level_mask(mask, tuple(cos.shape[-2:]), mask_threshold)
        push = cos if push_floor is None else cos.clamp(min=push_floor)
        total = total + ((1 - y) * (1 - cos) + push_weight * y * push).mean()
    return total


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    """Focal loss on the 2-class softmax. logits (B, 2, H, W), mask (B, 1, H, W) in {0, 1}.

    ``alpha`` weighs the anomalous class (1 - alpha the normal one); None weighs both 1.
    """
    target = (mask[:, 0] > 0.5).long()
    log_p = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1))[:, 0]
    weight = (1 - log_p.exp()) ** gamma
    if alpha is not None:
        weight = weight * torch.where(target == 1, alpha, 1 - alpha)
    return -(weight * log_p).mean()
