"""A naive baseline that bounds how easy a dataset is: per-pixel deviation from the mean normal image.

If this scores a high pixel AP, the defects are trivially separable and the dataset says little
about a real method; the embedded synthetic dataset keeps its mean pixel AP below 0.6.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from adps.data.images import load_mask, load_rgb
from adps.data.layout import Sample


def naive_anomaly_maps(train: list[Sample], test: list[Sample], size: int) -> np.ndarray:
    """(N, size, size) maps: mean absolute deviation of each test image from the mean train image."""
    mean_image = np.mean([load_rgb(s.image_path, size) for s in train], axis=0)
    return np.stack([np.abs(load_rgb(s.image_path, size) - mean_image).mean(axis=-1) for s in test])


def naive_baseline_scores(samples: list[Sample], size: int) -> dict[str, float]:
    """Pixel AP, pixel AUROC and image AUROC (max of the map) of the naive baseline on one category."""
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    maps = naive_anomaly_maps(train, test, size)
    masks = np.stack([load_mask(s.mask_path, size) for s in test]).astype(bool)
    labels = np.array([s.label for s in test])
    return {
        "pixel_ap": float(average_precision_score(masks.ravel(), maps.ravel())),
        "pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
        "image_auroc": float(roc_auc_score(labels, maps.reshape(len(test), -1).max(axis=1))),
    }
