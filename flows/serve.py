"""Serve the deployments: ``adps-pipeline/nightly`` on ``schedule.cron`` (and early when the monitor reports
drift), ``adps-monitor/watch`` on ``monitor.cron``, ``adps-tune/manual`` on demand.

Run by ``make up`` (with ``PREFECT_API_URL`` pointing at the local Prefect server); then
``prefect deployment run 'adps-pipeline/nightly'`` triggers a run right away.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from adps.config import load_params, params_path_or_project
from flows.monitor import DRIFT_EVENT, RESOURCE_PREFIX, adps_monitor
from flows.pipeline import adps_pipeline
from flows.tune import adps_tune

# The automation: a category's drift starts the nightly run early (it imports what was reviewed so far and
# retrains what changed). prefect.yaml declares the same trigger for teams that deploy to a work pool.
DRIFT_TRIGGER = DeploymentEventTrigger(
    name="nightly-early-on-drift",
    expect={DRIFT_EVENT},
    match={"prefect.resource.id": RESOURCE_PREFIX + "*"},
)
# One nightly run at a time: a run started while one is going (drift events of several categories, or an
# event during the scheduled run) is cancelled, not queued: the running one imports and trains what is there.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployments(params_path: str):
    params = load_params(params_path)
    return [
        adps_pipeline.to_deployment(
            name="nightly",
            cron=params.schedule.cron,
            parameters={"params_path": params_path},
            description="Nightly ADPS pipeline: import new images, retrain what changed, evaluate and register it",
            triggers=[DRIFT_TRIGGER],
            concurrency_limit=ONE_AT_A_TIME,
        ),
        adps_monitor.to_deployment(
            name="watch",
            cron=params.monitor.cron,
            parameters={"params_path": params_path},
            description="Drift monitor: each category's recent predictions against its champion's reference",
        ),
        adps_tune.to_deployment(
            name="manual",
            parameters={"params_path": params_path},
            description="Optuna study of one category; run with -p category=<name> [-p trials=N]",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    serve(*deployments(str(params_path_or_project(parser.parse_args().params).resolve())))


if __name__ == "__main__":
    main()
