"""The model: teacher + patch student, Weight Mask Block, Post-Segmentation Module, a memory bank, scoring.

One module for the three kinds of :data:`KINDS`, all on the same frozen teacher: ``adps`` (student,
WMB and PSM), ``memory_bank`` (nearest normal teacher feature, no training) and ``adps+memory_bank``
(both trained; the ADPS map, and the sum of the two image scores each standardised on held-out
normal images). A model holds the parts of the kind it was built as; ``set_scoring`` chooses which of
the kinds it holds it answers with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adps.model.backbones import Student, Teacher, stage_channels
from adps.model.memory_bank import MemoryBank, level_channels

ADPS, MEMORY_BANK, COMBINED = "adps", "memory_bank", "adps+memory_bank"
MAX_STRIDE = 16  # of the deepest teacher level
KINDS = (ADPS, MEMORY_BANK, COMBINED)


def held_kinds(kind: str) -> tuple[str, ...]:
    """The kinds a model built as ``kind`` can answer with (the combination holds all three)."""
    return KINDS if kind == COMBINED else (kind,)


@dataclass
class DistillOutput:
    """Per-level teacher and student maps and their cosine similarity.

    Attributes:
        teacher_feats: [(B, C_i, h_i, w_i)] for i = 1..3.
        student_feats: same shapes as ``teacher_feats`` (patches stitched back).
        cos_maps: [(B, 1, h_i, w_i)] cosine similarity per position (the WMB weights W_i).
    """

    teacher_feats: list[torch.Tensor]
    student_feats: list[torch.Tensor]
    cos_maps: list[torch.Tensor]


@dataclass
class AdpsOutput:
    """What the model returns in every mode.

    Attributes:
        anomaly_map: (B, 1, H, W) anomaly value per pixel, in [0, 1].
        logits: (B, 2, H, W) PSM logits (normal, anomalous), for the segmentation loss; None for a memory bank.
        image_score: (B,) image anomaly score (smoothed-map max or top-k mean; a z-score sum when combined).
        distill: the per-level teacher/student maps and cosine maps; None for a memory bank.
    """

    anomaly_map: torch.Tensor
    logits: torch.Tensor | None
    image_score: torch.Tensor
    distill: DistillOutput | None


def weight_mask(teacher_feats: list[torch.Tensor], cos_maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Weight Mask Block (Eqs. 1-2): C_i = (1 - W_i) * T_i with W_i = cos(T_i, S_i). No parameters."""
    return [(1 - w) * t for t, w in zip(teacher_feats, cos_maps, strict=True)]


def double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class PostSegmentation(nn.Module):
    """UNet up-path (Eqs. 3-6) from the re-weighted teacher maps to a full-resolution 2-class map.

    Start from C_3, then for C_2 and C_1: 2x transposed conv, concatenate, double conv. From 1/4 of the
    input, two more 2x up-steps without skip reach full resolution; a 3x3 conv gives 2 logits.
    """

    def __init__(self, level_channels: tuple[int, int, int], head_channels: tuple[int, int]):
        super().__init__()
        c1, c2, c3 = level_channels
        self.up3 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.fuse2 = double_conv(2 * c2, c2)
        self.up2 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.fuse1 = double_conv(2 * c1, c1)
        h1, h2 = head_channels
        self.up_half = nn.Sequential(nn.ConvTranspose2d(c1, h1, 2, stride=2), double_conv(h1, h1))
        self.up_full = nn.Sequential(nn.ConvTranspose2d(h1, h2, 2, stride=2), double_conv(h2, h2))
        self.head = nn.Conv2d(h2, 2, 3, padding=1)

    def forward(self, reweighted: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C_i, h_i, w_i)] -> (B, 2, 4*h_1, 4*w_1) logits."""
        c1, c2, c3 = reweighted
        x = self.fuse2(torch.cat([self.up3(c3), c2], dim=1))
        x = self.fuse1(torch.cat([self.up2(x), c1], dim=1))
        return self.head(self.up_full(self.up_half(x)))


def gaussian_radius(sigma: float) -> int:
    return max(1, math.ceil(3 * sigma))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = gaussian_radius(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def score_input_problem(height: int, width: int, method: str, sigma: float, topk: int, **_: object) -> str:
    """Why a map of ``height`` x ``width`` cannot be scored with these ``score.*`` settings ('' when it can):
    the smoothing mirrors the map by its radius, which must be shorter than a side, and ``topk`` needs that
    many pixels (ONNX's TopK fixes it)."""
    radius = gaussian_radius(sigma) if sigma > 0 else 0
    if min(height, width) <= radius:
        return (
            f"the model sees it as {width} x {height} px, and the image score's smoothing (score.sigma {sigma}) "
            f"needs more than {radius} px on a side: give a larger image (or a larger data.scale), or lower score.sigma"
        )
    if method == "topk" and height * width < topk:
        return (
            f"the model sees it as {width} x {height} px, fewer pixels than score.topk {topk}: give a larger image "
            "(or a larger data.scale), or lower score.topk"
        )
    return ""


class ImageScorer(nn.Module):
    """Image score from a (B, 1, H, W) map: max of the Gaussian-smoothed map, or mean of the top-k pixels."""

    def __init__(self, method: str, sigma: float, topk: int):
        super().__init__()
        self.method, self.sigma, self.topk = method, sigma, topk
        self.register_buffer("kernel", gaussian_kernel(sigma) if sigma > 0 else torch.ones(1), persistent=False)

    def input_problem(self, height: int, width: int) -> str:
        """See :func:`score_input_problem`."""
        return score_input_problem(height, width, self.method, self.sigma, self.topk)

    def smooth(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        if self.kernel.numel() == 1:
            return anomaly_map
        r = self.kernel.numel() // 2
        x = F.pad(anomaly_map, (r, r, r, r), mode="reflect")
        x = F.conv2d(x, self.kernel.view(1, 1, 1, -1))
        return F.conv2d(x, self.kernel.view(1, 1, -1, 1))

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        flat = self.smooth(anomaly_map).flatten(1)
        if self.method == "max":
            return flat.max(dim=1).values
        return flat.topk(min(self.topk, flat.shape[1]), dim=1).values.mean(dim=1)


class AdpsModel(nn.Module):
    """Teacher (whole image) + student (k x k patches) -> WMB -> PSM, and/or a memory bank -> map and score.

    ``kind`` says which parts exist: the student and PSM for ``adps``, the bank for ``memory_bank``,
    both for ``adps+memory_bank``.
    """

    def __init__(
        self,
        backbone: str,
        patches: int,
        split_after: tuple[int, ...],
        psm_head_channels: tuple[int, int],
        scoring: dict[str, Any],
        kind: str = ADPS,
        bank_levels: tuple[int, ...] = (1, 2),
        bank_neighbourhood: int = 3,
        input_size: int = 128,
    ):
        super().__init__()
        self.kind = kind
        self.teacher = Teacher(backbone)
        # Any input is padded to a multiple of this: the student's patch (its size in pixels is fixed by
        # training) and the deepest stride, so every level lines up with the teacher's.
        self.align = math.lcm(MAX_STRIDE, input_size // patches if patches > 1 else MAX_STRIDE)
        if kind != MEMORY_BANK:
            self.student = Student(backbone, patches, split_after, input_size)
            self.psm = PostSegmentation(stage_channels(backbone), psm_head_channels)
        if kind != ADPS:
            channels = level_channels(stage_channels(backbone), bank_levels)
            self.memory = MemoryBank(channels, bank_levels, bank_neighbourhood)
        self.set_scoring(**scoring)

    def set_scoring(
        self,
        method: str,
        sigma: float,
        topk: int,
        kind: str | None = None,
        normal_stats: dict[str, list[float]] | None = None,
    ) -> AdpsModel:
        """Choose how the image score is read off the map (``score.*`` params; no weights involved), and
        which held kind answers (default: the one built). ``normal_stats``: {kind: [mean, std]} of the
        two parts' scores on held-out normal images, which the combination needs."""
        kind = kind or self.kind
        if kind not in held_kinds(self.kind):
            raise ValueError(f"a model built as {self.kind} cannot answer as {kind}")
        device = self.teacher_device()
        self.scorer = ImageScorer(method, sigma, topk).to(device)
        self.answer = kind
        stats = normal_stats or {}  # none yet (before evaluate measures them): the raw scores are added
        center, scale = zip(*[stats.get(k, [0.0, 1.0]) for k in (ADPS, MEMORY_BANK)], strict=True)
        self.register_buffer("score_center", torch.tensor(center).to(device), persistent=False)
        self.register_buffer("score_scale", torch.tensor(scale).to(device), persistent=False)
        return self

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) mirrored out at the bottom and right to multiples of :attr:`align` (unchanged when they
        are multiples already). A mirror continues the texture: repeated edge pixels would fill the last
        patches with stripes that score as defects."""
        return mirror_to_multiple(mirror_to_multiple(image, -1, self.align), -2, self.align)

    def teacher_device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def distill(self, image: torch.Tensor) -> DistillOutput:
        """Teacher and student maps for (B, 3, H, W) images, and their per-level cosine maps."""
        with torch.no_grad():
            teacher_feats = self.teacher(image)
        student_feats = self.student(image)
        cos_maps = [
            F.cosine_similarity(t, s, dim=1).unsqueeze(1) for t, s in zip(teacher_feats, student_feats, strict=True)
        ]
        return DistillOutput(teacher_feats, student_feats, cos_maps)

    def segment(self, distill: DistillOutput, size: tuple[int, int], crop: tuple[int, int] | None = None) -> AdpsOutput:
        """WMB + PSM on given teacher/student maps -> anomaly map of ``size`` (its top-left ``crop`` when
        given) and image score."""
        logits = self.psm(weight_mask(distill.teacher_feats, distill.cos_maps))
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if crop is not None:
            logits = logits[..., : crop[0], : crop[1]]
        anomaly_map = logits.softmax(dim=1)[:, 1:2]
        return AdpsOutput(anomaly_map, logits, self.scorer(anomaly_map.detach()), distill)

    def forward(self, image: torch.Tensor) -> AdpsOutput:
        """Algorithm 1 (or the bank, or both): (B, 3, H, W) of any size -> anomaly map (B, 1, H, W) and image
        score (B,). The image is padded to a multiple of :attr:`align` and the map cropped back
        before scoring, so the padding never scores."""
        height, width = image.shape[-2], image.shape[-1]
        padded = self.pad(image)
        size = (padded.shape[-2], padded.shape[-1])
        if self.answer == MEMORY_BANK:
            with torch.no_grad():
                bank_map = self.memory(self.teacher(padded), size)[..., :height, :width]
            return AdpsOutput(bank_map, None, self.scorer(bank_map), None)
        out = self.segment(self.distill(padded), size, crop=(height, width))
        if self.answer == COMBINED:
            bank_map = self.memory(out.distill.teacher_feats, size)[..., :height, :width]
            z = (torch.stack([out.image_score, self.scorer(bank_map)], dim=1) - self.score_center) / self.score_scale
            out.image_score = z.sum(dim=1)
        return out


def cosine_anomaly_map(distill: DistillOutput, size: tuple[int, int]) -> torch.Tensor:
    """Ablation without WMB/PSM: mean over levels of (1 - cos), upsampled to ``size``. (B, 1, H, W)."""
    maps = [F.interpolate(1 - w, size=size, mode="bilinear", align_corners=False) for w in distill.cos_maps]
    return torch.stack(maps).mean(dim=0)


MIN_SIDE = 16  # the smallest image side the reader takes (adps.data.images.MIN_IMAGE_SIDE)


def mirror_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``x`` extended along ``dim`` to the next multiple of ``multiple`` with its mirror image (x, flipped x,
    x, ... as many times as a side as short as :data:`MIN_SIDE` needs), then cut to length. Traced for ONNX
    with that bound, so the exported graph pads any size the same way."""
    size = x.shape[dim]
    if not torch.jit.is_tracing():
        if size % multiple == 0:
            return x
        copies = 1 + math.ceil(((-size) % multiple) / size)
    else:
        copies = 1 + math.ceil(multiple / MIN_SIDE)
    tiled = torch.cat([x if i % 2 == 0 else x.flip(dim) for i in range(copies)], dim=dim)
    return tiled.narrow(dim, 0, size + (-size) % multiple)


def at_size(anomaly_map: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An (H, W) map resized (bilinear) to ``shape``, the ground truth's own size; unchanged when it has it."""
    if tuple(anomaly_map.shape) == tuple(shape):
        return anomaly_map
    return F.interpolate(anomaly_map[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
