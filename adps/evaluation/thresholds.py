"""Decision thresholds, chosen on the validation split (never on test) and shipped with the model."""

from __future__ import annotations

import numpy as np

from adps.config import ThresholdParams
from adps.evaluation.metrics import Images, f1_max, flat


def choose_threshold(scores: np.ndarray, labels: np.ndarray, cfg: ThresholdParams) -> float:
    """``f1``: the F1-optimal threshold; ``percentile``: that percentile of the normal scores."""
    labels = labels.astype(bool)
    if cfg.strategy == "percentile" or not labels.any():
        return float(np.percentile(scores[~labels], cfg.percentile))
    return f1_max(labels, scores)[1]


def choose_thresholds(
    image_scores: np.ndarray, labels: np.ndarray, maps: Images, masks: Images, cfg: ThresholdParams
) -> dict[str, float]:
    """Image and pixel thresholds from validation predictions."""
    return {
        "image": choose_threshold(image_scores, labels, cfg),
        "pixel": choose_threshold(flat(maps), flat(masks, bool), cfg),
    }
