"""Evaluation outputs: thresholds from validation, the metrics JSON, curve data and heatmap images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adps.config import EvaluationParams, ThresholdParams
from adps.data.datasets import load_rgb
from adps.evaluation.heatmaps import heatmap_panel, save_heatmap
from adps.evaluation.metrics import curves, decision_metrics, detection_metrics
from adps.evaluation.predictions import Predictions
from adps.evaluation.thresholds import choose_thresholds
from adps.files import write_json_atomically


def calibrate(val: Predictions, cfg: ThresholdParams, score: dict[str, Any]) -> dict[str, Any]:
    """Image and pixel thresholds from the validation split, how they were chosen, and the scoring they assume."""
    thresholds = choose_thresholds(val.scores, val.labels, val.maps, val.masks, cfg)
    return {
        **thresholds,
        "score": score,
        "strategy": cfg.strategy,
        "percentile": cfg.percentile,
        "source": "validation split",
        "n_validation_images": len(val.labels),
    }


def evaluation_report(test: Predictions, thresholds: dict[str, Any], cfg: EvaluationParams) -> dict[str, Any]:
    """Threshold-free metrics plus the quality of decisions at the validation thresholds."""
    metrics: dict[str, Any] = detection_metrics(test.scores, test.labels, test.maps, test.masks, cfg.aupro_fpr_limit)
    image = decision_metrics(test.labels.astype(bool), test.scores >= thresholds["image"])
    pixel = decision_metrics(test.masks.ravel(), test.maps.ravel() >= thresholds["pixel"])
    metrics.update({f"image_{k}_at_threshold": v for k, v in image.items()})
    metrics.update({f"pixel_{k}_at_threshold": v for k, v in pixel.items()})
    metrics.update(
        image_threshold=thresholds["image"],
        pixel_threshold=thresholds["pixel"],
        n_test=len(test.labels),
        n_test_anomalous=int(test.labels.sum()),
    )
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}


def write_curves(folder: Path, test: Predictions, points: int) -> None:
    """ROC and PR curves at image and pixel level, as JSON lists for ``dvc plots``."""
    pixel_scores, pixel_labels = test.maps.ravel(), test.masks.ravel()
    if len(pixel_scores) > 2_000_000:  # curves only: a seeded pixel subsample keeps files and time small
        keep = np.random.default_rng(0).choice(len(pixel_scores), 2_000_000, replace=False)
        pixel_scores, pixel_labels = pixel_scores[keep], pixel_labels[keep]
    for level, (labels, scores) in {"image": (test.labels, test.scores), "pixel": (pixel_labels, pixel_scores)}.items():
        for kind, rows in curves(labels, scores, points).items():
            write_json_atomically(folder / f"{level}_{kind}.json", rows)


def pick_heatmap_items(test: Predictions, n: int) -> dict[str, list[int]]:
    """Best and worst test images: ranked by how far the score sits on the right side of the data."""
    order = np.argsort(test.scores)
    rank = np.empty(len(order), float)
    rank[order] = np.arange(len(order)) / max(1, len(order) - 1)
    correctness = np.where(test.labels == 1, rank, 1 - rank)
    by_correctness = np.argsort(-correctness, kind="stable")
    return {"best": by_correctness[:n].tolist(), "worst": by_correctness[::-1][:n].tolist()}


def write_heatmaps(folder: Path, test: Predictions, pixel_threshold: float, n: int, size: int) -> None:
    """image | ground truth | map | predicted mask PNGs for the n best and n worst test images (into a new folder)."""
    for kind, items in pick_heatmap_items(test, n).items():
        for rank, i in enumerate(items):
            path = Path(test.paths[i])
            panel = heatmap_panel(load_rgb(path, size), test.maps[i], pixel_threshold, test.masks[i])
            caption = f"{kind} {rank + 1}: {path.parent.name}/{path.name} score={test.scores[i]:.3f}"
            save_heatmap(folder / f"{kind}_{rank + 1}_{path.parent.name}_{path.stem}.png", panel, caption)
