"""Which model kind a category ships, chosen on real labelled defects of the validation split when it has them.

Synthetic anomalies cannot choose: the ADPS parts were trained on them and would always win. With
``model.kind: auto`` the model holds every kind (ADPS, the memory bank, and their combination) and
each is scored on the validation split by its image AUROC on the real defects against the held-out
normal images. A few dozen defects measure an AUROC only to a few hundredths, so the choice follows
the one-standard-error rule of model selection (Breiman et al. 1984): the simplest kind (fewest
trained parts: the memory bank, then ADPS, then both) whose AUROC is within one standard error
(Hanley & McNeil 1982) of the best ships. Without real defects in validation ADPS ships
(:data:`DEFAULT_KIND`): only synthetic anomalies could judge, and on the embedded dataset's drawn
defects ADPS alone scores best (image AUROC 0.995 against 0.988 for the combination and 0.874 for
the bank, docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from adps.evaluation.metrics import image_metrics
from adps.evaluation.predictions import Predictions
from adps.model.network import ADPS, COMBINED, MEMORY_BANK, AdpsModel, held_kinds

DEFAULT_KIND = ADPS
SIMPLEST_FIRST = (MEMORY_BANK, ADPS, COMBINED)  # trained parts: none, student + PSM, both
STD_FLOOR = 1e-3  # both parts score in [0, 1]: a part flat on normal images is not blown up into noise


def normal_stats(val: dict[str, Predictions]) -> dict[str, list[float]]:
    """[mean, std] of each part's image scores on the held-out normal images (the combination's z-scores)."""
    stats = {}
    for kind in (ADPS, MEMORY_BANK):
        normal = val[kind].scores[(val[kind].labels == 0) & ~val[kind].synthetic]
        stats[kind] = [float(normal.mean()), float(max(normal.std(), STD_FLOOR))]
    return stats


def score_each_kind(
    model: AdpsModel, score: dict[str, Any], predict: Callable[[AdpsModel], Predictions]
) -> tuple[dict[str, Predictions], dict[str, dict[str, Any]]]:
    """``predict`` under each kind the model holds, and the scoring of each (the combination's with the
    normal statistics measured on the parts' validation predictions first).

    ``predict(model)`` returns validation predictions; the returned scorings are what thresholds.json
    ships under ``score``.
    """
    predictions, scorings = {}, {}
    for kind in held_kinds(model.kind):
        scorings[kind] = {**score, "kind": kind}
        if kind == COMBINED:
            scorings[kind]["normal_stats"] = normal_stats(predictions)
        model.set_scoring(**scorings[kind])
        predictions[kind] = predict(model)
    return predictions, scorings


def auroc_standard_error(auroc: float, n_anomalous: int, n_normal: int) -> float:
    """Standard error of an AUROC measured on ``n_anomalous`` and ``n_normal`` images (Hanley & McNeil 1982)."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    variance = auroc * (1 - auroc) + (n_anomalous - 1) * (q1 - auroc**2) + (n_normal - 1) * (q2 - auroc**2)
    return float(np.sqrt(max(variance, 0.0) / (n_anomalous * n_normal)))


def choose_kind(requested: str, val: dict[str, Predictions]) -> tuple[str, str]:
    """(kind, why): ``requested`` unless it is ``auto``; then, on real validation defects, the simplest kind
    within one standard error of the best image AUROC; without them, the default."""
    if requested != "auto":
        return requested, "model.kind"
    real = {kind: pred.real() for kind, pred in val.items()}
    n_defects = next(iter(val.values())).n_real_defects
    if n_defects == 0 or len(val) == 1:
        return DEFAULT_KIND, "auto: the default (the validation split has no real defects)"
    auroc = {kind: image_metrics(pred.scores, pred.labels)["image_auroc"] for kind, pred in real.items()}
    n_normal = int((next(iter(real.values())).labels == 0).sum())
    error = auroc_standard_error(max(auroc.values()), n_defects, n_normal)
    chosen = next(kind for kind in SIMPLEST_FIRST if kind in auroc and auroc[kind] >= max(auroc.values()) - error)
    shown = ", ".join(f"{kind} {value:.3f}" for kind, value in auroc.items())
    return chosen, (
        f"auto: the simplest kind within one standard error ({error:.3f}) of the best validation image AUROC "
        f"on {n_defects} real defects and {n_normal} normal images ({shown})"
    )


def kind_table(test: dict[str, Predictions], val: dict[str, Predictions]) -> dict[str, dict[str, float | None]]:
    """Per held kind: test image AUROC and AP, and validation image AUROC on real defects (None without)."""
    table = {}
    for kind, pred in test.items():
        real = val[kind].real()
        row = {k: v for k, v in image_metrics(pred.scores, pred.labels).items() if k in ("image_auroc", "image_ap")}
        row["val_image_auroc"] = image_metrics(real.scores, real.labels)["image_auroc"] if real.labels.any() else None
        table[kind] = {k: (None if v is None or np.isnan(v) else float(v)) for k, v in row.items()}
    return table
