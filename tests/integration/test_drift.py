"""Drift checks on windows of real predictions: quiet on the reference's own distribution, loud on a shift.

Images come from the embedded generator with fresh seeds (the same distribution as the reference's),
scored by a fixed tiny model through the code that logs a prediction in production.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps.config import MonitorParams
from adps.data.embedded import generate_category
from adps.inference import ImageSource
from adps.production.drift import bonferroni, build_reference, expected_flag_rate, window_report
from adps.production.log import LogSettings, PredictionLog
from tests.conftest import tiny_params
from tests.integration.test_prediction_log import untrained_predictor

N_WINDOWS, WINDOW = 10, 30


def normals(folder: Path, seed: int, n: int) -> list[Path]:
    """``n`` fresh normal washer images of the embedded generator's distribution (seed ``seed``)."""
    params = tiny_params(synthetic={"n_train": n, "n_test_good": 1, "n_test_defect": 1})
    generate_category("washer", params.synthetic, seed, folder / str(seed))
    return sorted((folder / str(seed) / "train/good").glob("*.png"))[:n]


def darker(paths: list[Path], folder: Path, factor: float) -> list[Path]:
    """The same images with the lighting turned down (``factor`` of their brightness)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = folder / path.name
        Image.fromarray((np.asarray(Image.open(path), np.float32) * factor).astype(np.uint8)).save(target)
        out.append(target)
    return out


def logged_rows(predictor, paths: list[Path]) -> list[dict]:
    """The rows the prediction log writes for these images (the same code, no store needed)."""
    log = PredictionLog(LogSettings(None, None), "predict", "m")
    sources = [ImageSource(str(p), path=p) for p in paths]
    results = predictor.predict_batch(sources)
    return [log.pending_row(r, s, predictor.thresholds).row for r, s in zip(results, sources, strict=True)]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A fixed model, its reference on 40 held-out normals (none flagged), and 10 fresh windows of 30 normals."""
    folder = tmp_path_factory.mktemp("drift")
    predictor = untrained_predictor()
    held_out = normals(folder, 100, 40)
    scores = [r.score for r in predictor.predict_paths(held_out)]
    predictor.thresholds["image"] = max(scores) + 1e-3
    reference = build_reference(predictor.predict_paths(held_out), predictor.thresholds)
    windows = [normals(folder, 200 + i, WINDOW) for i in range(N_WINDOWS)]
    return folder, predictor, reference, windows


def test_windows_from_the_reference_distribution_raise_no_alarm(scored):
    _, predictor, reference, windows = scored
    cfg = MonitorParams(min_predictions=WINDOW)
    reports = [window_report(reference, logged_rows(predictor, paths), cfg) for paths in windows]
    alarms = [r["alarms"] for r in reports if r["alarms"]]
    print(f"false alarms: {len(alarms)} of {N_WINDOWS} in-distribution windows: {alarms}")
    assert len(alarms) <= 1  # Bonferroni bounds the rate by monitor.alpha (0.01) per window
    assert set(reports[0]["checks"]) == {"score", "flag_rate", "input", "features"}


def test_a_lighting_shift_is_flagged_in_every_window(scored):
    folder, predictor, reference, windows = scored
    cfg = MonitorParams(min_predictions=WINDOW)
    for i, paths in enumerate(windows[:3]):
        report = window_report(reference, logged_rows(predictor, darker(paths, folder / f"dark{i}", 0.8)), cfg)
        assert "input" in report["alarms"] and report["status"].startswith("drift: ")
        assert "mean shift brightness -0." in report["checks"]["input"]["detail"]


def test_a_threshold_that_flags_every_image_raises_the_flag_rate_alarm(scored):
    _, predictor, reference, windows = scored
    rows = [row | {"is_anomalous": True} for row in logged_rows(predictor, windows[0])]
    report = window_report(reference, rows, MonitorParams(min_predictions=WINDOW))
    assert report["alarms"] == ["flag_rate"] and report["checks"]["flag_rate"]["statistic"] == 1.0
    assert report["checks"]["flag_rate"]["detail"] == "30 of 30 flagged, 4.4% expected"  # 1/42 + 2 %


def test_a_window_too_small_is_reported_not_tested(scored):
    _, predictor, reference, windows = scored
    report = window_report(reference, logged_rows(predictor, windows[0][:4]), MonitorParams(min_predictions=5))
    assert report["alarms"] == [] and report["status"] == "too few predictions (4 < monitor.min_predictions 5)"


def test_flag_rate_expected_and_bonferroni_worked_by_hand():
    # 0 of 32 held-out normals flagged: Laplace (0 + 1) / (32 + 2) = 0.029412, plus 2 % expected defects.
    assert expected_flag_rate({"n_flagged": 0, "n_normal": 32}, 0.02) == pytest.approx(0.049412, abs=1e-6)
    # three tests, smallest p 0.004 (from b): adjusted 0.012; largest statistic 0.7.
    assert bonferroni({"a": (0.7, 0.5), "b": (0.2, 0.004), "c": (0.1, 0.9)}) == (0.7, pytest.approx(0.012), "b")
