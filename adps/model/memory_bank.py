"""A memory bank of normal teacher features: each test position's distance to its nearest normal one.

The PatchCore idea (Roth et al., CVPR 2022) on the pipeline's own teacher: the features of every
position of the normal training images form a bank, thinned by a greedy k-center coreset so that
memory and search time stay bounded; a test position's anomaly value is the L2 distance of its
feature to the nearest bank entry. Each feature first averages its 3 x 3 (``neighbourhood``)
positions, as PatchCore does: a position then describes a small patch, not one receptive-field centre
(on real solar-cell defects it helps one cell type and not the other; on 1-3 px defects it hurts:
docs/results.md, bank ablation). No training, plain
arguments, no params object (as the rest of :mod:`adps.model`).
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
        features = features @ projection.to(features.device)  # seeded on the CPU: the same coreset on any device
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = torch.randint(len(features), (1,), generator=generator)
    distance = distances_to(features, features[chosen[0]])
    for step in range(1, size):
        chosen[step] = torch.argmax(distance)
        distance = torch.minimum(distance, distances_to(features, features[chosen[step]]))
    return chosen


def distances_to(features: torch.Tensor, point: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """(N,) L2 distance of each row to ``point``, in chunks of rows (each row's value as in one piece; the
    chunks stay in cache, 1.5x faster on a CPU at 100k rows)."""
    return torch.cat([torch.linalg.vector_norm(rows - point, dim=1) for rows in features.split(chunk)])


def subsample(features: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most ``limit`` rows of ``features``: all of them when they fit, else a seeded random subset in order."""
    if len(features) <= limit:
        return features
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
    return features[keep.sort().values]


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

    def fill(self, bank: torch.Tensor) -> None:
        """Replace the entries (N, C)."""
        self.bank, self.bank_sq = bank.contiguous(), (bank**2).sum(dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A saved bank of any size loads (the empty one of a freshly built model takes its shape)."""
        if prefix + "bank" in state_dict:
            self.fill(torch.empty_like(state_dict[prefix + "bank"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
        if torch.jit.is_tracing():  # one product in the exported graph, whatever the batch
            return self.nearest_squared(queries).clamp(min=0).sqrt().view(b, 1, h, w)
        nearest = [self.nearest_squared(q) for q in queries.split(self.chunk)]
        return torch.cat(nearest).clamp(min=0).sqrt().view(b, 1, h, w)

    def nearest_squared(self, queries: torch.Tensor) -> torch.Tensor:
        squared = (queries**2).sum(dim=1, keepdim=True) - 2 * queries @ self.bank.T + self.bank_sq
        return squared.min(dim=1).values


class MemoryBank(nn.Module):
    """Teacher maps -> (B, 1, H, W) anomaly map in [0, 1): each position's nearest-neighbour distance
    ``d`` to the bank, upsampled, as ``d / (d + scale)``; ``scale`` is a high percentile of the distances
    of held-out normal images, so normal pixels stay below 0.5 and the map reads like the ADPS map.

    The bank starts empty (a built model loads its entries from a checkpoint); :func:`build_bank` fills it.
    """

    def __init__(self, channels: int, levels: tuple[int, ...], neighbourhood: int):
        super().__init__()
        self.levels, self.neighbourhood = tuple(levels), neighbourhood
        self.search = NearestNeighbourMap(torch.zeros(0, channels))
        self.register_buffer("scale", torch.ones(()))

    def features(self, teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w): the chosen levels, each averaged over its ``neighbourhood`` x ``neighbourhood`` positions."""
        k = self.neighbourhood
        if k > 1:
            teacher_feats = [
                F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in teacher_feats
            ]
        return position_features(teacher_feats, self.levels)

    def distances(self, teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        """(B, 1, h, w) distance of each position to its nearest bank entry."""
        if self.search.bank.shape[0] == 0:
            raise ValueError("the memory bank is empty: it is filled by the distill stage (`adps distill`)")
        return self.search(self.features(teacher_feats))

    def forward(self, teacher_feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        upsampled = F.interpolate(self.distances(teacher_feats), size=size, mode="bilinear", align_corners=False)
        return upsampled / (upsampled + self.scale)


def level_channels(channels: tuple[int, ...], levels: tuple[int, ...]) -> int:
    """Width of a bank entry: the sum of the chosen levels' channels."""
    return sum(channels[i] for i in levels)


@torch.no_grad()
def build_bank(
    bank: MemoryBank,
    teacher,
    normal_batches: list[torch.Tensor],
    held_out: list[torch.Tensor],
    coreset_ratio: float,
    max_entries: int,
    projection_dim: int,
    seed: int,
    max_positions: int | None = None,
) -> dict[str, float]:
    """Fill ``bank`` with a coreset of the normal training positions' features; ``scale`` from ``held_out``.

    At most ``max_positions`` positions (a seeded subset) enter the coreset choice, which costs positions x
    entries. Returns what was built: positions seen, entries kept, and the scale.
    """
    every = torch.cat([bank.features(teacher(b)).permute(0, 2, 3, 1).flatten(0, 2) for b in normal_batches])
    feats = every if max_positions is None else subsample(every, max_positions, seed)
    size = max(1, min(max_entries, round(coreset_ratio * len(feats))))
    bank.search.fill(feats[greedy_coreset(feats, size, projection_dim, seed)])
    distances = torch.cat([bank.distances(teacher(b)).flatten() for b in held_out]) if held_out else feats.new_ones(1)
    bank.scale = torch.quantile(distances, 0.99).clamp(min=1e-6).reshape(())
    return {"positions": len(every), "entries": size, "scale": float(bank.scale)}
