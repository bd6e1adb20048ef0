"""Optuna studies in MLflow: a parent run per study and a nested run per trial."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adps.config import Params
from adps.tracking.connection import use_experiment

logger = logging.getLogger(__name__)


def study_parent_run(params: Params, study: str, category: str) -> str:
    """The parent MLflow run of an Optuna study (tag ``optuna_study``): reused when the study is continued."""
    import mlflow

    use_experiment(params)
    found = mlflow.search_runs(filter_string=f"tags.optuna_study = '{study}'", output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=study, tags={"optuna_study": study, "category": category}) as run:
        return run.info.run_id


@contextlib.contextmanager
def trial_run(
    parent_run_id: str, study: str, number: int, category: str, values: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """A nested run for one tuning trial; the caller fills the yielded dict with ``state`` and ``value``."""
    import mlflow

    outcome: dict[str, Any] = {"state": "FAIL"}
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"trial-{number}", parent_run_id=parent_run_id, nested=True):
        mlflow.log_params({k: str(v) for k, v in values.items()})
        mlflow.set_tags({"optuna_trial": str(number), "optuna_trial_of": study, "category": category})
        try:
            yield outcome
        finally:
            mlflow.set_tag("state", outcome["state"])
            if "value" in outcome:
                mlflow.log_metric("value", outcome["value"])
            mlflow.log_metric("duration_s", time.perf_counter() - started)


def log_study_summary(
    parent_run_id: str,
    best: dict[str, Any],
    best_value: float,
    best_params_file: Path,
    importances: dict[str, float] | None,
    history_figure: Any,
) -> None:
    """Best params and value, the best-params file, parameter importances and the history plot on the parent run."""
    import mlflow

    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_params({f"best.{k}": str(v) for k, v in best.items()})
        mlflow.log_metric("best_value", best_value)
        mlflow.log_artifact(str(best_params_file))
        if importances is not None:
            mlflow.log_dict(importances, "param_importances.json")
        mlflow.log_figure(history_figure, "optimization_history.png")


def fail_trial_run(study: str, number: int) -> None:
    """Mark the MLflow run of a trial whose worker died (still RUNNING) as FAILED."""
    import mlflow

    query = f"tags.optuna_trial_of = '{study}' and tags.optuna_trial = '{number}' and attributes.status = 'RUNNING'"
    for run in mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list"):
        client = mlflow.MlflowClient()
        client.set_tag(run.info.run_id, "state", "FAIL")
        client.set_terminated(run.info.run_id, status="FAILED")
        logger.warning("trial %d of %s: its worker died; run %s marked FAILED", number, study, run.info.run_id)
