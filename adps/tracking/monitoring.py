"""The drift monitor's MLflow side: the champion's reference, and one run per category and window.

:func:`monitor_category` is the whole check of one category: the flow ``adps-monitor`` (flows/monitor.py)
runs it per category and turns the reports into Prefect artifacts and events.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adps import paths
from adps.config import Params
from adps.errors import AdpsError
from adps.production.drift import ERRORS, drift_alarms, window_report
from adps.production.log import log_settings, read_rows
from adps.tracking.connection import connect
from adps.tracking.registry import CHAMPION, model_name

logger = logging.getLogger(__name__)
MONITOR_EXPERIMENT_SUFFIX = "-monitor"  # runs go to experiment <tracking.experiment>-monitor


def champion_reference(params: Params, category: str) -> tuple[dict[str, Any], str]:
    """The reference registered with the category's champion, and what it is ("version N", or the local
    model folder's when no champion is registered or it has no reference)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = connect(params, create=False)
    try:
        version = client.get_model_version_by_alias(model_name(category), CHAMPION)
        model_id = version.model_id or version.source.removeprefix("models:/")  # registered from models:/m-<id>
        location = client.get_logged_model(model_id).artifact_location
        uri = f"{location}/artifacts/model_dir/{paths.REFERENCE_FILE}"
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        return json.loads(Path(local).read_text()), f"champion version {version.version}"
    except (MlflowException, OSError, ValueError) as err:
        fallback = paths.reference_file(params, category)
        if not fallback.is_file():
            raise AdpsError(
                f"{category}: no champion reference in the registry ({type(err).__name__}) and no {fallback}: "
                f"run `adps evaluate -c {category}` and `adps register -c {category}` (or dvc repro)"
            ) from err
        logger.warning("%s: no champion reference in the registry (%s); using %s", category, err, fallback)
        try:
            return json.loads(fallback.read_text()), f"local {paths.in_project(params, fallback)}"
        except ValueError as bad:
            raise AdpsError(f"{fallback} is not a reference ({bad}): run `adps evaluate -c {category}`") from bad


def monitor_category(params: Params, category: str, since: datetime, until: datetime) -> dict[str, Any]:
    """One category's window ``[since, until)`` (UTC) of logged predictions of its champion, checked against the
    champion's reference and logged as an MLflow run."""
    settings = log_settings(params)
    if settings.url is None:
        raise AdpsError("production.log is null: there is no prediction log to monitor")
    reference, answered_by = champion_reference(params, category)
    if reference.get("category") != category:
        raise AdpsError(
            f"{category}: the reference of the {answered_by} is of category {reference.get('category')!r}: "
            f"register {category}'s own model (`adps evaluate -c {category}`, `adps register -c {category}`)"
        )
    rows = [r for r in read_rows(settings.url, since, until, category) if r["psm_sha256"] == reference["psm_sha256"]]
    report = window_report(reference, rows, params.monitor)
    report.update(category=category, model=answered_by, since=since.isoformat(), until=until.isoformat())
    report["mlflow_run_id"] = log_window(params, report, until)
    return report


def log_window(params: Params, report: dict[str, Any], until: datetime) -> str:
    """One MLflow run per category and window; metrics stamped with the window's end, so charts follow time."""
    import mlflow

    connect(params)
    mlflow.set_experiment(params.tracking.experiment + MONITOR_EXPERIMENT_SUFFIX)
    stamp = int(until.replace(tzinfo=UTC).timestamp() * 1000)  # windows are in UTC
    metrics = {
        "n_predictions": report["n_predictions"],
        "n_errors": report["n_errors"],
        "drift": float(bool(drift_alarms(report))),  # what retraining answers
        "inputs_failing": float(ERRORS in report["alarms"]),  # what it cannot: the camera or the client
    }
    if report["error_rate"] is not None:
        metrics["error_rate"] = report["error_rate"]
    for name, check in report["checks"].items():
        metrics.update({f"{name}_statistic": check["statistic"], f"{name}_p_value": check["p_value"]})
    tags = {
        "category": report["category"],
        "model": report["model"],
        "status": report["status"],
        "window_start": report["since"],
        "window_end": report["until"],
    }
    with mlflow.start_run(run_name=f"{report['category']} {until:%Y-%m-%d %H:%M}", tags=tags) as run:
        for key, value in metrics.items():
            mlflow.log_metric(key, float(value), step=stamp // 60000, timestamp=stamp)
        mlflow.log_dict(report, "drift_report.json")
    return run.info.run_id
