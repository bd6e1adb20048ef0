"""Drift of a window of logged predictions against the champion's reference, with scipy's tests.

The reference (``models/<category>/reference.json``, written by ``adps evaluate`` and registered with the
model) is what the model saw on held-out normal images, measured by the same code that logs a
prediction: image scores, the share flagged at the shipped threshold, input statistics and the teacher's
pooled features. A window is compared with it by four checks, each a p-value:

- ``score``: two-sample Kolmogorov-Smirnov test of the window's image scores;
- ``flag_rate``: one-sided binomial test of the flagged count against the expected rate: the held-out
  normals' flagged share (Laplace-smoothed, (k + 1) / (n + 2)) plus ``monitor.expected_defect_rate``;
- ``input``: KS test of each input statistic (brightness, contrast, sharpness), Bonferroni over them;
- ``features``: KS test of each of the reference's first ``monitor.feature_components`` principal
  components of the pooled teacher features, Bonferroni over them;
- ``errors``: one-sided binomial test of the predictions that failed (an unreadable, truncated or too
  small input: a row with an error and no score) against ``monitor.expected_error_rate``.

The four drift checks need ``monitor.min_predictions`` scored predictions; ``errors`` needs that many
predictions, scored or not, so a camera that sends only broken frames is reported, not "too few". A check
alarms below ``monitor.alpha / (number of checks that ran)``: the chance that a window from the
reference's own distribution (and the expected error rate) raises any alarm is at most ``monitor.alpha``
(Bonferroni). An ``errors`` alarm says the inputs fail, not that the model drifted: it never starts a
retraining (flows/monitor.py sends it as its own event).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from adps.config import MonitorParams

INPUT_STATISTICS = ("brightness", "contrast", "sharpness")
ERRORS = "errors"  # the check of failed predictions: an alarm about the inputs, not drift of the model
REFERENCE_VERSION = 1


def input_statistics(image: np.ndarray) -> dict[str, float]:
    """An (H, W, 3) image in [0, 1], as the model sees it -> brightness (mean grey), contrast (its standard
    deviation) and sharpness (mean absolute 4-neighbour Laplacian of the grey image)."""
    gray = image.mean(axis=2, dtype=np.float32)
    laplacian = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    sharpness = float(np.abs(laplacian).mean())
    return {"brightness": float(gray.mean()), "contrast": float(gray.std()), "sharpness": sharpness}


def build_reference(results: list[Any], thresholds: dict[str, Any]) -> dict[str, Any]:
    """The reference of a model from its predictions (:class:`adps.inference.ImagePrediction`) on held-out
    normal images."""
    scored = [r for r in results if not r.error]
    features = [r.features.tolist() for r in scored if r.features is not None]
    return {
        "version": REFERENCE_VERSION,
        "category": thresholds.get("category"),
        "psm_sha256": thresholds.get("checkpoint_sha256"),
        "image_threshold": float(thresholds["image"]),
        "n_normal": len(scored),
        "scores": [float(r.score) for r in scored],
        "n_flagged": int(sum(bool(r.is_anomalous) for r in scored)),
        "statistics": {name: [input_statistics(r.image)[name] for r in scored] for name in INPUT_STATISTICS},
        "features": features if len(features) == len(scored) else None,
    }


def expected_flag_rate(reference: dict[str, Any], defect_rate: float) -> float:
    """Normal images flagged at the shipped threshold (Laplace-smoothed) plus the expected share of defects."""
    false_alarms = (reference["n_flagged"] + 1) / (reference["n_normal"] + 2)
    return min(0.999, false_alarms + defect_rate)


def ks(window: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    result = stats.ks_2samp(window, reference)
    return float(result.statistic), float(result.pvalue)


def bonferroni(tests: dict[str, tuple[float, float]]) -> tuple[float, float, str]:
    """(largest statistic, Bonferroni-adjusted smallest p-value, the name of the test that gave it)."""
    name = min(tests, key=lambda k: tests[k][1])
    return max(s for s, _ in tests.values()), min(1.0, tests[name][1] * len(tests)), name


def feature_components(reference: np.ndarray, window: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Both samples projected on the reference's first ``k`` principal components (at most n_ref - 1)."""
    center = reference.mean(axis=0)
    _, _, vt = np.linalg.svd(reference - center, full_matrices=False)
    basis = vt[: max(1, min(k, len(reference) - 1))].T
    return (reference - center) @ basis, (window - center) @ basis


def is_scored(row: dict[str, Any]) -> bool:
    return not row["error"] and row["score"] is not None


def error_check(n_errors: int, n_predictions: int, expected: float) -> dict[str, Any]:
    """One-sided binomial test: more failed predictions than ``expected`` (monitor.expected_error_rate)?"""
    p = float(stats.binomtest(n_errors, n_predictions, expected, alternative="greater").pvalue)
    return {
        "statistic": n_errors / n_predictions,
        "p_value": p,
        "detail": f"{n_errors} of {n_predictions} predictions failed, {expected:.1%} expected",
    }


def window_checks(reference: dict[str, Any], rows: list[dict[str, Any]], cfg: MonitorParams) -> dict[str, Any]:
    """The drift checks of one window's logged rows (one category, one model) against ``reference`` (their
    alarms are set by :func:`window_report`, which knows how many checks ran)."""
    scored = [r for r in rows if is_scored(r)]
    checks: dict[str, dict[str, Any]] = {}
    scores = np.array([r["score"] for r in scored], np.float64)
    statistic, p = ks(scores, np.array(reference["scores"]))
    checks["score"] = {
        "statistic": statistic,
        "p_value": p,
        "detail": f"median {np.median(scores):.3f} vs {np.median(reference['scores']):.3f} on held-out normals",
    }
    flagged, expected = (
        int(sum(bool(r["is_anomalous"]) for r in scored)),
        expected_flag_rate(reference, cfg.expected_defect_rate),
    )
    p = float(stats.binomtest(flagged, len(scored), expected, alternative="greater").pvalue)
    checks["flag_rate"] = {
        "statistic": flagged / len(scored),
        "p_value": p,
        "detail": f"{flagged} of {len(scored)} flagged, {expected:.1%} expected",
    }
    per_stat = {
        name: ks(np.array([r[name] for r in scored]), np.array(reference["statistics"][name]))
        for name in INPUT_STATISTICS
    }
    statistic, p, worst = bonferroni(per_stat)
    shifts = {name: np.mean([r[name] for r in scored]) - np.mean(reference["statistics"][name]) for name in per_stat}
    shown = ", ".join(f"{name} {shift:+.3f}" for name, shift in shifts.items())
    checks["input"] = {"statistic": statistic, "p_value": p, "detail": f"mean shift {shown}; most drifted: {worst}"}
    with_features = [r for r in scored if r.get("features")]
    if reference.get("features") and len(with_features) >= cfg.min_predictions:
        window = np.stack([np.frombuffer(r["features"], np.float16).astype(np.float64) for r in with_features])
        ref, win = feature_components(np.array(reference["features"], np.float64), window, cfg.feature_components)
        per_component = {f"pc{i + 1}": ks(win[:, i], ref[:, i]) for i in range(ref.shape[1])}
        statistic, p, worst = bonferroni(per_component)
        checks["features"] = {"statistic": statistic, "p_value": p, "detail": f"{worst} of {ref.shape[1]} components"}
    return checks


def window_report(reference: dict[str, Any], rows: list[dict[str, Any]], cfg: MonitorParams) -> dict[str, Any]:
    """One category's window: its counts and error rate, the checks that enough predictions allow, the alarms
    (each check at ``monitor.alpha`` over the number that ran) and a status line."""
    n_scored = sum(map(is_scored, rows))
    n_errors = len(rows) - n_scored
    report: dict[str, Any] = {
        "n_predictions": len(rows),
        "n_errors": n_errors,
        "error_rate": n_errors / len(rows) if rows else None,
        "checks": window_checks(reference, rows, cfg) if n_scored >= cfg.min_predictions else {},
    }
    if len(rows) >= cfg.min_predictions:
        report["checks"][ERRORS] = error_check(n_errors, len(rows), cfg.expected_error_rate)
    for check in report["checks"].values():
        check["alarm"] = check["p_value"] < cfg.alpha / len(report["checks"])
    report["alarms"] = [name for name, check in report["checks"].items() if check["alarm"]]
    report["status"] = window_status(report, n_scored, cfg.min_predictions)
    return report


def window_status(report: dict[str, Any], n_scored: int, min_predictions: int) -> str:
    """'40 of 40 predictions failed; too few scored ...', 'drift: input', 'no drift', 'too few predictions ...'."""
    parts = []
    if ERRORS in report["alarms"]:
        parts.append(f"{report['n_errors']} of {report['n_predictions']} predictions failed")
    drift = [name for name in report["alarms"] if name != ERRORS]
    if n_scored < min_predictions:
        counted = f"{n_scored} of {report['n_predictions']} scored" if report["n_errors"] else str(n_scored)
        parts.append(f"too few predictions ({counted} < monitor.min_predictions {min_predictions})")
    elif drift:
        parts.append("drift: " + ", ".join(drift))
    elif not parts:
        parts.append("no drift")
    return "; ".join(parts)


def drift_alarms(report: dict[str, Any]) -> list[str]:
    """The alarms that say the model's inputs or answers drifted (what a retraining can answer)."""
    return [name for name in report.get("alarms", []) if name != ERRORS]
