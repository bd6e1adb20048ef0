"""The two training phases of ADPS as step functions over a batch.

1. Asymmetric distillation: the student (patches) learns to match the frozen teacher (whole
   image) on normal pixels and to disagree on synthetic-anomaly pixels (Eq. 7).
2. PSM: the Post-Segmentation Module learns the anomaly mask from the WMB-re-weighted teacher
   maps with the focal loss (Eq. 8), student frozen; ``joint`` also updates the student with
   L_d + lambda * L_s (the paper's joint form).
"""

from __future__ import annotations

from typing import Any

import torch

from adps.config import LossParams, PsmPhaseParams
from adps.model.losses import distillation_loss, focal_loss
from adps.model.network import AdpsModel


def distill_loss_of(model: AdpsModel, image: torch.Tensor, mask: torch.Tensor, loss: LossParams):
    """(L_d, distill output) for a batch."""
    out = model.distill(image)
    value = distillation_loss(
        out.teacher_feats, out.student_feats, mask, loss.push_weight, loss.push_floor, loss.mask_threshold
    )
    return value, out


def distill_step(model: AdpsModel, loss: LossParams, device: torch.device):
    """Step of phase 1: only the student trains."""

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model.student.train()
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        value, _ = distill_loss_of(model, image, mask, loss)
        return {"loss": value, "loss_distill": value.detach()}

    return step


def psm_step(model: AdpsModel, loss: LossParams, cfg: PsmPhaseParams, device: torch.device):
    """Step of phase 2: the PSM trains (and the student too when ``cfg.joint``)."""

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model.psm.train()
        model.student.train(cfg.joint)
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        if cfg.joint:
            l_d, distill = distill_loss_of(model, image, mask, loss)
        else:
            with torch.no_grad():
                distill = model.distill(image)
        l_s = focal_loss(
            model.segment(distill, tuple(image.shape[-2:])).logits, mask, loss.focal_gamma, loss.focal_alpha
        )
        if not cfg.joint:
            return {"loss": l_s, "loss_seg": l_s.detach()}
        total = l_d + loss.seg_weight * l_s
        return {"loss": total, "loss_distill": l_d.detach(), "loss_seg": l_s.detach()}

    return step


def psm_param_groups(model: AdpsModel, cfg: PsmPhaseParams) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = [{"params": list(model.psm.parameters())}]
    if cfg.joint:
        groups.append({"params": list(model.student.parameters()), "lr": cfg.student_lr})
    return groups
