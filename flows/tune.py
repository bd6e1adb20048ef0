"""Prefect flow ``adps-tune``: an Optuna study for one category, run on demand (deployment ``manual``)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from adps import tuning
from adps.config import load_params, params_path_or_project


@task(name="tune", cache_policy=NO_CACHE)
def tune_task(params_path: str, category: str, trials: int | None, workers: int) -> dict[str, Any]:
    """The study (not a DVC stage: it runs whenever asked)."""
    return tuning.tune(load_params(params_path), category, trials, workers)


@flow(name="adps-tune", log_prints=True)
def adps_tune(
    category: str, params_path: str | None = None, trials: int | None = None, workers: int = 1
) -> dict[str, Any]:
    """Add ``trials`` trials to the category's study; publish the best params as an artifact."""
    result = tune_task(str(params_path_or_project(params_path).resolve()), category, trials, workers)
    lines = "\n".join(f"| `{k}` | {v} |" for k, v in result["best_params"].items())
    create_markdown_artifact(
        key=f"tuning-{category}".lower().replace("_", "-"),
        markdown=f"# Best params of {result['study']} (value {result['best_value']:.4f})\n\n| param | value |\n"
        f"|---|---|\n{lines}\n\nApply: `adps tune --category {category} --apply` or `{result['dvc_exp_run']}`\n",
    )
    return result
