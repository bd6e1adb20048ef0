"""Anomaly-detection metrics: image/pixel AUROC and AP, AUPRO (vectorised), F1-max.

All functions take numpy arrays: image ``scores`` (N,) and ``labels`` (N,) in {0, 1}; pixel
``maps`` and ``masks`` (boolean) as N arrays (H_i, W_i), each image at its own size (a list), or (N, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


def has_both_classes(labels: np.ndarray) -> bool:
    return bool(labels.any() and not labels.all())


def safe_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if has_both_classes(labels) else float("nan")


def safe_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(average_precision_score(labels, scores)) if labels.any() else float("nan")


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it (score >= threshold -> anomalous)."""
    if not labels.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


Images = Sequence[np.ndarray] | np.ndarray  # N maps or masks, (H_i, W_i) each


def flat(images: Images, dtype: type = np.float32) -> np.ndarray:
    """Every pixel of N images of any sizes, in image order (as ``ravel`` of an (N, H, W) stack)."""
    return np.concatenate([np.asarray(i).ravel() for i in images]) if len(images) else np.zeros(0, dtype)


def region_weights(masks: Images) -> list[np.ndarray]:
    """Per-pixel weight 1 / (region size * number of regions) inside GT regions, 0 outside (one array per mask).

    Summing the weights of the pixels above a threshold gives the mean per-region overlap (PRO).
    """
    weights = [np.zeros(np.shape(mask), np.float64) for mask in masks]
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if n:
            sizes = np.bincount(labelled.ravel())
            regions.append((i, labelled, sizes))
    n_regions = sum(len(sizes) - 1 for _, _, sizes in regions)
    for i, labelled, sizes in regions:
        inside = labelled > 0
        weights[i][inside] = 1.0 / (sizes[labelled[inside]] * n_regions)
    return weights


def aupro(maps: Images, masks: Images, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, normalised to [0, 1].

    One sort of all pixels: walking thresholds from high to low, PRO grows by each anomalous pixel's
    region weight and FPR by 1 / n_normal for each normal pixel. Ties are collapsed to one point.
    """
    labels = flat(masks, bool).astype(bool)
    if not labels.any() or labels.all():
        return float("nan")
    scores = flat(maps)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    pro = np.cumsum(flat(region_weights([np.asarray(m, bool) for m in masks]), np.float64)[order])
    fpr = np.cumsum(~labels[order]) / (~labels).sum()
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr, pro = np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    if cut < len(fpr):
        pro_at_limit = np.interp(fpr_limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
        fpr, pro = np.r_[fpr[:cut], fpr_limit], np.r_[pro[:cut], pro_at_limit]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def downsample_curve(x: np.ndarray, y: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= points:
        return x, y
    idx = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[idx], y[idx]


def curves(labels: np.ndarray, scores: np.ndarray, points: int) -> dict[str, list[dict[str, float]]]:
    """ROC and PR curves, downsampled to about ``points`` points each (for DVC plots)."""
    if not has_both_classes(labels):
        return {"roc": [], "pr": []}
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    fpr, tpr = downsample_curve(fpr, tpr, points)
    recall, precision = downsample_curve(recall[::-1], precision[::-1], points)
    return {
        "roc": [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr, strict=True)],
        "pr": [{"recall": float(a), "precision": float(b)} for a, b in zip(recall, precision, strict=True)],
    }


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max with its threshold."""
    f1, threshold = f1_max(labels, scores)
    return {
        "image_auroc": safe_auroc(labels, scores),
        "image_ap": safe_ap(labels, scores),
        "image_f1_max": f1,
        "image_f1_max_threshold": threshold,
    }


def pixel_metrics(maps: Images, masks: Images, fpr_limit: float) -> dict[str, float]:
    """Pixel-level AUROC, AP, AUPRO and F1-max; all NaN (never 0) when no pixel is a defect."""
    pixel_labels, pixel_scores = flat(masks, bool).astype(bool), flat(maps)
    f1, threshold = f1_max(pixel_labels, pixel_scores)
    return {
        "pixel_auroc": safe_auroc(pixel_labels, pixel_scores),
        "pixel_ap": safe_ap(pixel_labels, pixel_scores),
        "aupro": aupro(maps, masks, fpr_limit),
        "pixel_f1_max": f1,
        "pixel_f1_max_threshold": threshold,
    }


def detection_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: Images,
    masks: Images,
    fpr_limit: float,
    masked: np.ndarray | None = None,
) -> dict[str, float]:
    """The per-category metric set of the paper's protocol.

    ``masked`` (N,) bool: the images whose pixels are labelled (normal images, and defect images
    with a mask). Image metrics use every image; pixel metrics only these (default: all), so a
    defect labelled by image only never counts as a defect-free map.
    """
    keep = np.ones(len(labels), bool) if masked is None else masked.astype(bool)
    kept = [i for i in range(len(labels)) if keep[i]]
    return image_metrics(scores, labels) | pixel_metrics([maps[i] for i in kept], [masks[i] for i in kept], fpr_limit)


def decision_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of hard decisions (e.g. at the validation-split threshold)."""
    tp = float(np.sum(predicted & labels))
    precision = tp / max(1.0, float(predicted.sum()))
    recall = tp / max(1.0, float(labels.sum()))
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12)}
