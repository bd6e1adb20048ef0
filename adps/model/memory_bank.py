"""A memory bank of normal teacher features: each test position's distance to its nearest normal one.

The PatchCore idea (Roth et al., CVPR 2022) on the pipeline's own teacher: the features of every
position of the normal training images form a bank, thinned by a greedy k-center coreset so that
memory and search time stay bounded; a test position's anomaly value is the L2 distance of its
feature to the nearest bank entry. No training, plain arguments, no params object (as the rest of
:mod:`adps.model`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def position_features(teacher_feats: list[torch.Tensor], levels: tuple[int, ...]) -> torch.Tensor:
    """The chosen teacher levels at the first one's resolution, concatenated: (B, sum C_i, h, w)."""
    size = teacher_feats[levels[0]].shape[-2:]
    return torch.cat(
        [F.interpolate(teacher_feats[i], size=size, mode="bilinear", align_corners=False) for i in levels], dim=1
    )


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` rows of ``features`` (N, C) chosen by greedy k-center selection.

    Each step takes the row farthest from every row taken so far, so the kept rows cover the whole
    set: any row lies within the final covering radius of a kept one. Distances are measured after a
    seeded random projection to ``projection_dim`` dimensions (the Johnson-Lindenstrauss shortcut of
    PatchCore), which keeps the selection O(N · size · projection_dim).
    """
    if size >= len(features):
        return torch.arange(len(features))
    generator = torch.Generator().manual_seed(seed)
    if projection_dim < features.shape[1]:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        features = features @ projection
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = torch.randint(len(features), (1,), generator=generator)
    distance = torch.linalg.vector_norm(features - features[chosen[0]], dim=1)
    for step in range(1, size):
        chosen[step] = torch.argmax(distance)
        distance = torch.minimum(distance, torch.linalg.vector_norm(features - features[chosen[step]], dim=1))
    return chosen


class NearestNeighbourMap(nn.Module):
    """(B, C, h, w) features -> (B, 1, h, w) L2 distance of each position to its nearest bank entry.

    The search is a matrix product (|q|² - 2 q·b + |b|²) in chunks of queries: exact, ONNX-exportable,
    and at these bank sizes (thousands of entries, a few hundred dimensions) as fast on a CPU as an
    approximate index, which would only pay for banks of millions.
    """

    def __init__(self, bank: torch.Tensor, chunk: int = 1024):
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank**2).sum(dim=1))
        self.chunk = chunk

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
        nearest = [self.nearest_squared(q) for q in queries.split(self.chunk)]
        return torch.cat(nearest).clamp(min=0).sqrt().view(b, 1, h, w)

    def nearest_squared(self, queries: torch.Tensor) -> torch.Tensor:
        squared = (queries**2).sum(dim=1, keepdim=True) - 2 * queries @ self.bank.T + self.bank_sq
        return squared.min(dim=1).values
