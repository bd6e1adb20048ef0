"""Evaluation outputs: thresholds from validation, the metrics JSON, curve data and heatmap images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adps.config import EvaluationParams, ThresholdParams
from adps.data.images import load_rgb
from adps.evaluation.heatmaps import heatmap_panel, save_heatmap
from adps.evaluation.metrics import curves, decision_metrics, detection_metrics
from adps.evaluation.predictions import Predictions
from adps.evaluation.thresholds import choose_threshold
from adps.files import write_atomically, write_json_atomically


def calibrate(val: Predictions, cfg: ThresholdParams, score: dict[str, Any]) -> dict[str, Any]:
    """Image and pixel thresholds from the validation split, how they were chosen, and the scoring they assume.

    When the validation split holds real labelled defects, the image threshold is chosen on them and the
    normal images alone (synthetic anomalies left out); pixel thresholds use every image with a mask.
    """
    on_real = val.n_real_defects > 0
    image = val.real() if on_real else val
    return {
        "image": choose_threshold(image.scores, image.labels, cfg),
        "pixel": choose_threshold(*val.pixels(), cfg),
        "score": score,
        "strategy": cfg.strategy,
        "percentile": cfg.percentile,
        "source": "validation split",
        "n_validation_images": len(val.labels),
        "image_threshold_on": image_threshold_basis(image, on_real, cfg.strategy),
    }


def image_threshold_basis(val: Predictions, on_real: bool, strategy: str = "f1") -> str:
    """What the image threshold was chosen on, in words (the version page shows it)."""
    normals = int((val.labels == 0).sum())
    if strategy == "percentile":
        return f"a percentile of the scores of {normals} held-out normal images"
    if on_real:
        return f"real defects: {val.n_real_defects} labelled defect images and {normals} normal images"
    return f"synthetic anomalies on {normals} held-out normal images"


def evaluation_report(test: Predictions, thresholds: dict[str, Any], cfg: EvaluationParams) -> dict[str, Any]:
    """Threshold-free metrics plus the quality of decisions at the validation thresholds."""
    metrics: dict[str, Any] = detection_metrics(
        test.scores, test.labels, test.maps, test.masks, cfg.aupro_fpr_limit, test.masked
    )
    image = decision_metrics(test.labels.astype(bool), test.scores >= thresholds["image"])
    maps, masks = test.pixels()
    pixel = decision_metrics(masks, maps >= thresholds["pixel"]) if masks.any() else dict.fromkeys(image, np.nan)
    metrics.update({f"image_{k}_at_threshold": v for k, v in image.items()})
    metrics.update({f"pixel_{k}_at_threshold": v for k, v in pixel.items()})
    metrics.update(
        image_threshold=thresholds["image"],
        image_threshold_on=thresholds.get("image_threshold_on"),
        pixel_threshold=thresholds["pixel"],
        n_test=len(test.labels),
        n_test_anomalous=int(test.labels.sum()),
        n_test_anomalous_masked=int(test.labels.sum()) - test.n_unmasked,
    )
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}


def pixel_coverage(metrics: dict[str, Any]) -> str:
    """Which test images the pixel metrics stand on (defect images without a mask are left out)."""
    anomalous, masked = metrics.get("n_test_anomalous", 0), metrics.get("n_test_anomalous_masked", 0)
    if masked == anomalous:
        return f"Pixel metrics: every test image ({anomalous} defect images, all with masks)."
    if masked == 0:
        return f"Image metrics only: none of the {anomalous} defect images has a mask (labelled by image)."
    return f"Pixel metrics over the {masked} of {anomalous} defect images that have a mask; image metrics over all."


def curve_data(test: Predictions, points: int) -> dict[str, list[dict[str, float]]]:
    """ROC and PR curves at image and pixel level: ``{"image_roc": [...], "pixel_pr": [...], ...}``."""
    pixel_scores, pixel_labels = test.pixels()
    if len(pixel_scores) > 2_000_000:  # curves only: a seeded pixel subsample keeps files and time small
        keep = np.random.default_rng(0).choice(len(pixel_scores), 2_000_000, replace=False)
        pixel_scores, pixel_labels = pixel_scores[keep], pixel_labels[keep]
    data = {}
    for level, (labels, scores) in {"image": (test.labels, test.scores), "pixel": (pixel_labels, pixel_scores)}.items():
        for kind, rows in curves(labels, scores, points).items():
            data[f"{level}_{kind}"] = rows
    return data


def write_curves(folder: Path, test: Predictions, points: int) -> None:
    """The curves as JSON lists for ``dvc plots``, and drawn in ``curves.png`` (the MLflow UI shows it)."""
    data = curve_data(test, points)
    for name, rows in data.items():
        write_json_atomically(folder / f"{name}.json", rows)
    save_curves_figure(folder / "curves.png", data)


def save_curves_figure(path: Path, data: dict[str, list[dict[str, float]]]) -> None:
    """ROC and PR curves, image and pixel level, in one 2 x 2 figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(8, 7))
    for row, level in enumerate(("image", "pixel")):
        for col, (kind, x, y) in enumerate((("roc", "fpr", "tpr"), ("pr", "recall", "precision"))):
            rows, ax = data[f"{level}_{kind}"], axes[row][col]
            ax.plot([r[x] for r in rows], [r[y] for r in rows])
            ax.set(title=f"{level} {kind.upper()}", xlabel=x, ylabel=y, xlim=(0, 1), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
    plt.close(figure)


def pick_heatmap_items(test: Predictions, n: int) -> dict[str, list[int]]:
    """Best and worst test images: ranked by how far the score sits on the right side of the data."""
    order = np.argsort(test.scores)
    rank = np.empty(len(order), float)
    rank[order] = np.arange(len(order)) / max(1, len(order) - 1)
    correctness = np.where(test.labels == 1, rank, 1 - rank)
    by_correctness = np.argsort(-correctness, kind="stable")
    return {"best": by_correctness[:n].tolist(), "worst": by_correctness[::-1][:n].tolist()}


def write_heatmaps(folder: Path, test: Predictions, pixel_threshold: float, n: int) -> None:
    """image | ground truth | map | predicted mask PNGs for the n best and n worst test images (into a new
    folder), at each image's own size (the maps' and masks' size)."""
    for kind, items in pick_heatmap_items(test, n).items():
        for rank, i in enumerate(items):
            path = Path(test.paths[i])
            truth = test.masks[i] if test.masked[i] else None  # grey: not known, not "no defect"
            panel = heatmap_panel(load_rgb(path, None), test.maps[i], pixel_threshold, truth)
            unlabelled = "" if test.masked[i] else " (no mask)"
            caption = f"{kind} {rank + 1}: {path.parent.name}/{path.name}{unlabelled} score={test.scores[i]:.3f}"
            save_heatmap(folder / f"{kind}_{rank + 1}_{path.parent.name}_{path.stem}.png", panel, caption)


def save_heatmap_grid(path: Path, heatmaps: Path) -> None:
    """The heatmap panels of a folder stacked into one image (best first, then worst), for a quick look."""
    panels = [Image.open(p).convert("RGB") for p in sorted(heatmaps.glob("*.png"))]
    if not panels:
        return
    width, height = max(p.width for p in panels), sum(p.height for p in panels)
    grid = Image.new("RGB", (width, height), "white")
    top = 0
    for panel in panels:
        grid.paste(panel, (0, top))
        top += panel.height
    write_atomically(path, lambda tmp: grid.save(tmp, format="PNG"))
