"""Drift checks on windows of real predictions: quiet on the reference's own distribution, loud on a shift.

Images come from the embedded generator with fresh seeds (the same distribution as the reference's),
scored by a fixed tiny model through the code that logs a prediction in production.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps.config import MonitorParams
from adps.data.embedded import generate_category
from adps.inference import ImageSource
from adps.production.drift import bonferroni, build_reference, drift_alarms, expected_flag_rate, window_report
from adps.production.log import LogSettings, PredictionLog, read_rows
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
    assert set(reports[0]["checks"]) == {"score", "flag_rate", "input", "features", "errors"}
    assert all(r["error_rate"] == 0.0 and r["status"] == "no drift" for r in reports if not r["alarms"])


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


def truncated(paths: list[Path], folder: Path) -> list[Path]:
    """The frames a failing camera sends: each image's file cut after half its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        (folder / f"{i:03d}.png").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return sorted(folder.iterdir())


def stored_rows(predictor, paths: list[Path], url: str) -> list[dict]:
    """Predict ``paths`` and record them in a real SQLite log; the rows the monitor reads back."""
    log = PredictionLog(LogSettings(url, None), "predict", "models/washer")
    sources = [ImageSource(str(p), path=p) for p in paths]
    log.record(predictor.predict_batch(sources), sources, predictor.thresholds)
    assert log.flush(30) and log.counts["lost"] == 0
    return read_rows(url)


def test_a_window_of_failed_predictions_alarms_errors_and_is_not_drift(scored, tmp_path):
    """The issue's example: 40 logged predictions that all failed (truncated frames). Too few are scored for the
    drift checks, so the errors check runs alone, at monitor.alpha / 1."""
    _, predictor, reference, windows = scored
    frames = truncated([*windows[0], *windows[1][:10]], tmp_path / "frames")
    rows = stored_rows(predictor, frames, f"sqlite:///{tmp_path / 'predictions.db'}")
    assert len(rows) == 40 and all(r["error"] and r["score"] is None for r in rows)
    report = window_report(reference, rows, MonitorParams(min_predictions=30, expected_error_rate=0.01))
    # P(X >= 40) for X ~ Binomial(40, 0.01): only X = 40, 0.01 ** 40 = 1e-80, far below alpha / 1 = 0.01
    assert report["checks"]["errors"]["p_value"] == pytest.approx(0.01**40, rel=1e-9)
    assert report["alarms"] == ["errors"] and drift_alarms(report) == [] and set(report["checks"]) == {"errors"}
    assert report["n_errors"] == report["n_predictions"] == 40 and report["error_rate"] == 1.0
    assert report["status"] == (
        "40 of 40 predictions failed; too few predictions (0 of 40 scored < monitor.min_predictions 30)"
    )
    assert report["checks"]["errors"]["detail"] == "40 of 40 predictions failed, 1.0% expected"


def test_failed_predictions_are_tested_in_the_bonferroni_family_of_the_drift_checks(scored, tmp_path):
    """30 scored + 10 failed: five checks ran, each at alpha / 5; 1 failed of 31 stays within the expected rate."""
    _, predictor, reference, windows = scored
    broken = truncated(windows[1][:10], tmp_path / "frames")
    rows = logged_rows(predictor, [*windows[0], *broken])
    report = window_report(reference, rows, MonitorParams(min_predictions=30, expected_error_rate=0.01))
    assert set(report["checks"]) == {"score", "flag_rate", "input", "features", "errors"}
    # P(X >= 10), X ~ Binomial(40, 0.01): sum over k = 10..40 of C(40, k) 0.01^k 0.99^(40 - k), about 3e-12
    by_hand = sum(math.comb(40, k) * 0.01**k * 0.99 ** (40 - k) for k in range(10, 41))
    assert report["checks"]["errors"]["p_value"] == pytest.approx(by_hand, rel=1e-9) and by_hand < 0.01 / 5
    assert "errors" in report["alarms"] and report["status"].startswith("10 of 40 predictions failed")
    assert report["error_rate"] == 0.25
    one = window_report(reference, logged_rows(predictor, [*windows[0], broken[0]]), MonitorParams(min_predictions=30))
    # P(X >= 1), X ~ Binomial(31, 0.01) = 1 - 0.99^31 = 0.2676: no alarm
    assert one["checks"]["errors"]["p_value"] == pytest.approx(1 - 0.99**31, rel=1e-9)
    assert "errors" not in one["alarms"] and one["error_rate"] == pytest.approx(1 / 31)


def test_the_monitor_shows_the_error_rate_and_sends_failures_apart_from_drift(scored, tmp_path):
    """The flow's table and markdown, the MLflow run, and the events: failing inputs never start a retraining
    (the nightly deployment's trigger, in flows/serve.py and prefect.yaml, expects the drift event alone)."""
    import yaml
    from mlflow import MlflowClient

    from adps.tracking.monitoring import log_window
    from flows.monitor import DRIFT_EVENT, FAILING_EVENT, drift_markdown, events_of, report_row
    from flows.serve import DRIFT_TRIGGER
    from tests.conftest import REPO_ROOT

    _, predictor, reference, windows = scored
    frames = truncated([*windows[0], *windows[1][:10]], tmp_path / "frames")
    report = window_report(reference, logged_rows(predictor, frames), MonitorParams(min_predictions=30))
    since, until = datetime(2026, 12, 1, 9), datetime(2026, 12, 1, 10)
    report.update(category="washer", model="local models/washer/reference.json", since=str(since), until=str(until))
    params = tiny_params().at(tmp_path)
    report["mlflow_run_id"] = log_window(params, report, until)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(report["mlflow_run_id"])
    assert run.data.metrics["error_rate"] == 1.0 and run.data.metrics["n_errors"] == 40
    assert run.data.metrics["inputs_failing"] == 1.0 and run.data.metrics["drift"] == 0.0
    assert run.data.tags["status"].startswith("40 of 40 predictions failed")

    row = report_row(report)
    assert row["errors"] == 40 and row["error rate"].startswith(
        "100.0% (40 of 40 predictions failed, 1.0% expected; p="
    )
    assert row["error rate"].endswith("ALARM)")
    assert "- **error rate**: 100.0% (40 of 40" in drift_markdown([row], since, until)
    assert events_of(report) == [FAILING_EVENT]
    drifted = report | {"alarms": ["input", "errors"]}
    assert events_of(drifted) == [DRIFT_EVENT, FAILING_EVENT]
    assert DRIFT_TRIGGER.expect == {DRIFT_EVENT}
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    assert [t["expect"] for d in declared for t in d.get("triggers", [])] == [[DRIFT_EVENT]]
