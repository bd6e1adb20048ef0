"""One MLflow run per category: params, final metrics, per-epoch history and artifacts."""

from __future__ import annotations

import json
import logging
from typing import Any

from adps import paths
from adps.config import Params, flatten_params

logger = logging.getLogger(__name__)


def history_metrics(params: Params, category: str) -> list[tuple[str, float, int]]:
    """(key, value, step) of every per-epoch number of both training phases."""
    rows = []
    for phase in ("distill", "psm"):
        path = paths.train_history(params, category, phase)
        if path.is_file():
            for entry in json.loads(path.read_text()):
                rows += [(f"{phase}_{k}", float(v), int(entry["epoch"])) for k, v in entry.items() if k != "epoch"]
    return rows


def logged_params(params: Params) -> dict[str, str]:
    """Params as the MLflow run holds them (strings, cut at MLflow's length limit)."""
    return {k: str(v)[:6000] for k, v in flatten_params(params).items()}


def log_run_contents(run_id: str, params: Params, category: str, metrics: dict[str, Any]) -> None:
    """Params, final metrics, history with steps, artifacts and tags of one category's run."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    client.log_batch(run_id, params=[Param(k, v) for k, v in logged_params(params).items()])
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    numbers |= {  # each kind the model holds, on the same test split: the UI compares kinds like runs
        f"kind.{kind.replace('+', '_and_')}.{k}": float(v)
        for kind, row in metrics.get("kinds", {}).items()
        for k, v in row.items()
        if v is not None
    }
    history = [Metric(k, v, 0, step) for k, v, step in history_metrics(params, category)]
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in numbers.items()] + history)
    for path in (
        paths.metrics_file(params, category),
        paths.validation_summary(params, category),
        paths.train_history(params, category, "distill"),
        paths.train_history(params, category, "psm"),
        paths.onnx_file(params, category),
    ):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.log_dict(run_id, params.model_dump(mode="json"), "params.yaml")  # the params that ran, whichever file
    for folder, name in (
        (paths.heatmaps_dir(params, category), "heatmaps"),
        (paths.plots_dir(params, category), "plots"),
    ):
        if folder.is_dir():
            client.log_artifacts(run_id, str(folder), name)
