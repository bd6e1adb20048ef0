"""Prefect flow ``adps-monitor``: drift of each category's recent predictions against its champion.

Per category: the window of the last ``monitor.window_hours`` of logged predictions of the champion,
checked against the reference registered with it (:mod:`adps.production.drift`), one MLflow run per
window (experiment ``<tracking.experiment>-monitor``). Then a table and a markdown artifact (with each
window's error rate), and two kinds of Prefect event (resource ``adps.category.<name>``):

- ``adps.drift.detected`` for each category that drifted, which the nightly deployment's trigger
  (prefect.yaml, flows/serve.py) answers by starting the nightly run early;
- ``adps.inputs.failing`` for each category whose predictions fail more often than
  ``monitor.expected_error_rate``. No deployment answers it: retraining cannot mend a camera that sends
  broken frames or a client that sends bad requests. Point a notification automation at it.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from adps.config import load_params, params_path_or_project
from adps.errors import AdpsError
from adps.production.drift import ERRORS, drift_alarms
from adps.production.log import utc_now
from adps.tracking.monitoring import monitor_category

DRIFT_EVENT = "adps.drift.detected"
FAILING_EVENT = "adps.inputs.failing"  # never a trigger of the nightly run (retraining cannot fix inputs)
RESOURCE_PREFIX = "adps.category."


@task(name="monitor", task_run_name="monitor@{category}", cache_policy=NO_CACHE)
def monitor_task(params_path: str, category: str, since: datetime, until: datetime) -> dict[str, Any]:
    return monitor_category(load_params(params_path), category, since, until)


def window_bounds(until: str | None, hours: float) -> tuple[datetime, datetime]:
    """The window ``[until - hours, until)`` in UTC without a zone, as the log stamps rows; ``until`` is an ISO
    time (a zone offset is converted; none means UTC), default now."""
    if hours <= 0:
        raise AdpsError(f"the window must be positive: hours={hours}")
    try:
        end = datetime.fromisoformat(until) if until else None
    except ValueError:
        raise AdpsError(f"until={until!r} is not an ISO time such as 2026-12-01T10:00:00 (UTC) or ...+02:00") from None
    if end is None:
        end = utc_now()
    elif end.tzinfo is not None:
        end = end.astimezone(UTC).replace(tzinfo=None)
    return end - timedelta(hours=hours), end


def report_row(report: dict[str, Any]) -> dict[str, Any]:
    """One row of the run's table: the window's counts and error rate, and each check's result and p-value
    (the errors check's under "error rate", beside the count it tests)."""
    row = {
        "category": report["category"],
        "status": report["status"],
        "model": report.get("model", "-"),
        "predictions": report.get("n_predictions", 0),
        "errors": report.get("n_errors", 0),
        "error rate": "-" if report.get("error_rate") is None else f"{report['error_rate']:.1%}",
    }
    for name, check in report.get("checks", {}).items():
        shown = f"p={check['p_value']:.2g}{' ALARM' if check['alarm'] else ''}"
        if name == ERRORS:
            row["error rate"] += f" ({check['detail']}; {shown})"
        else:
            row[name] = f"{check['detail']}; {shown}"
    return row


def drift_markdown(rows: list[dict[str, Any]], since: datetime, until: datetime) -> str:
    lines = [f"# Drift, {since:%Y-%m-%d %H:%M:%S} to {until:%Y-%m-%d %H:%M:%S} UTC", ""]
    for row in rows:
        lines += [f"## {row['category']}: {row['status']}", f"{row['predictions']} predictions ({row['model']})", ""]
        lines += [f"- **{k}**: {v}" for k, v in row.items() if k not in ("category", "status", "model", "predictions")]
        lines.append("")
    lines.append(
        "Checks: score (KS vs held-out normals), flag_rate (binomial vs expected), input (KS of brightness, "
        "contrast, sharpness), features (KS of the teacher's pooled features' principal components), errors "
        "(binomial test of the failed predictions vs monitor.expected_error_rate: the inputs fail, which "
        "retraining cannot fix)."
    )
    return "\n".join(lines)


def announce(event: str, report: dict[str, Any], facts: dict[str, Any]) -> None:
    """A Prefect event about one category's window: its ``facts``, what it says and where it is recorded."""
    emit_event(
        event=event,
        resource={
            "prefect.resource.id": RESOURCE_PREFIX + report["category"],
            "prefect.resource.name": report["category"],
        },
        payload=facts | {k: report[k] for k in ("status", "model", "since", "until", "mlflow_run_id")},
    )


def announce_drift(report: dict[str, Any]) -> None:
    """A category that drifted: what the nightly deployment's trigger reacts to."""
    announce(DRIFT_EVENT, report, {"alarms": drift_alarms(report)})


def announce_failing_inputs(report: dict[str, Any]) -> None:
    """A category whose predictions fail more than expected: for people, not retraining."""
    facts = {k: report[k] for k in ("n_errors", "n_predictions", "error_rate")}
    announce(FAILING_EVENT, report, facts | {"detail": report["checks"][ERRORS]["detail"]})


ANNOUNCE = {DRIFT_EVENT: announce_drift, FAILING_EVENT: announce_failing_inputs}


def events_of(report: dict[str, Any]) -> list[str]:
    """The events a category's window sends: drift (a retraining may answer it) and failing inputs (a person
    must: the nightly deployment's trigger never sees it), each when its alarms rang."""
    alarms = report.get("alarms", [])
    return [DRIFT_EVENT] * bool(drift_alarms(report)) + [FAILING_EVENT] * (ERRORS in alarms)


@flow(name="adps-monitor", log_prints=True)
def adps_monitor(params_path: str | None = None, hours: float | None = None, until: str | None = None) -> list[dict]:
    """Check the last ``hours`` (default ``monitor.window_hours``) of predictions up to ``until`` (ISO time, UTC;
    default now) of every category; announce the ones that drifted, and apart, the ones whose inputs fail.

    A category without a champion reference or without a log is reported as such, and the others go on.
    """
    params_path = str(params_path_or_project(params_path).resolve())
    params = load_params(params_path)
    start, end = window_bounds(until, hours or params.monitor.window_hours)
    futures = {c: monitor_task.submit(params_path, c, start, end) for c in params.data.categories}
    reports = []
    for category, future in futures.items():
        try:
            reports.append(future.result())
        except Exception as err:  # one category's problem (its reference, the store) never hides the others
            get_run_logger().warning("%s: not monitored: %s", category, err)
            reports.append({"category": category, "status": f"not monitored: {err}", "alarms": []})
    rows = [report_row(r) for r in reports]
    create_table_artifact(key="adps-drift", table=rows, description="Drift of each category's window of predictions")
    create_markdown_artifact(
        key="adps-drift-report", markdown=drift_markdown(rows, start, end), description="Drift report of this window"
    )
    for report in reports:
        for event in events_of(report):
            ANNOUNCE[event](report)
    print("; ".join(f"{r['category']}: {r['status']}" for r in reports))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    parser.add_argument("--hours", type=float, default=None, help="window length (default: monitor.window_hours)")
    parser.add_argument("--until", default=None, help="window end, ISO time in UTC (default: now)")
    args = parser.parse_args()
    adps_monitor(args.params, args.hours, args.until)


if __name__ == "__main__":
    main()
