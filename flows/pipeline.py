"""Prefect flow ``adps-pipeline``: the same stages as dvc.yaml, observable, categories in parallel.

prepare -> validate (a failure stops everything before training and lists the bad files in a
markdown artifact) -> per category, in parallel: distill -> psm -> evaluate -> register -> a table
artifact of every category's metrics -> ``dvc commit`` so DVC versions what this run produced.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from adps import stages
from adps.config import DEFAULT_PARAMS_PATH, Params, load_params
from adps.errors import AdpsError, ValidationFailed

TRANSIENT_RETRIES = 2  # for I/O with servers (MLflow, DVC remote); training never retries


def stage_task(stage: Callable[..., dict[str, Any]], retries: int = 0):
    """A Prefect task running one ``adps.stages`` function with the params file at ``params_path``."""

    def run(params_path: str, *args: str) -> dict[str, Any]:
        return stage(load_params(params_path), *args)

    run.__name__ = run.__qualname__ = stage.__name__
    return task(run, name=stage.__name__, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=10)


prepare_task = stage_task(stages.prepare)
validate_task = stage_task(stages.validate)
distill_task = stage_task(stages.distill)
psm_task = stage_task(stages.psm)
evaluate_task = stage_task(stages.evaluate)
export_task = stage_task(stages.export)
register_task = stage_task(stages.register, retries=TRANSIENT_RETRIES)


@task(name="dvc-commit", cache_policy=NO_CACHE, retries=TRANSIENT_RETRIES, retry_delay_seconds=5)
def dvc_commit_task(targets: list[str]) -> str:
    """Record the outputs of this run in dvc.lock, so ``dvc status`` is clean and DVC versions them."""
    dvc = Path(sys.executable).with_name("dvc")
    out = subprocess.run([str(dvc), "commit", "--force", *targets], capture_output=True, text=True)
    if out.returncode != 0:
        raise AdpsError(f"dvc commit failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def task_runner(params: Params):
    """Threads on one machine (default), or a Dask cluster at ``runtime.dask_address``."""
    if params.runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=params.runtime.dask_address)
    return ThreadPoolTaskRunner(max_workers=params.runtime.max_workers)


def failures_markdown(failures: list[dict[str, str]]) -> str:
    rows = "\n".join(f"| `{f['file']}` | {f['check']} | {f['reason']} |" for f in failures)
    return f"# Dataset validation failed\n\nNo training ran.\n\n| file | check | reason |\n|---|---|---|\n{rows}\n"


def run_validation(params_path: str) -> None:
    try:
        validate_task(params_path)
    except ValidationFailed as err:
        create_markdown_artifact(
            key="validation-failures",
            markdown=failures_markdown(err.failures),
            description="Files that failed dataset validation",
        )
        raise


def category_row(category: str, futures: dict[str, Any]) -> dict[str, Any]:
    """One row of the metrics table: the category's headline metrics and registry version, or its failure."""
    failed = next((name for name, f in futures.items() if not f.state.is_completed()), None)
    if failed:
        return {"category": category, "status": f"failed at {failed}"}
    metrics, registry = futures["evaluate"].result(), futures["register"].result()
    headline = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "metrics"}
    return {
        "category": category,
        "status": "ok",
        **headline,
        "version": registry["version"],
        "aliases": ",".join(registry["aliases"]),
    }


def dvc_targets(categories: list[str]) -> list[str]:
    """Stages whose outputs this run produced (the failed categories' stages are left alone)."""
    return [
        "prepare",
        "validate",
        *[f"{stage}@{c}" for c in categories for stage in ("distill", "psm", "evaluate", "export", "register")],
    ]


@flow(name="adps-categories")
def train_categories(params_path: str, categories: list[str]) -> list[dict[str, Any]]:
    """Every category's chain, in parallel on this flow's task runner; one metrics row per category."""
    chains = {}
    for category in categories:
        d = distill_task.submit(params_path, category)
        p = psm_task.submit(params_path, category, wait_for=[d])
        e = evaluate_task.submit(params_path, category, wait_for=[p])
        x = export_task.submit(params_path, category, wait_for=[e])
        r = register_task.submit(params_path, category, wait_for=[x])
        chains[category] = {"distill": d, "psm": p, "evaluate": e, "export": x, "register": r}
    wait([f for chain in chains.values() for f in chain.values()])
    return [category_row(category, chain) for category, chain in chains.items()]


@flow(name="adps-pipeline", log_prints=True)
def adps_pipeline(params_path: str = str(DEFAULT_PARAMS_PATH)) -> list[dict[str, Any]]:
    """Prepare, validate, then train, evaluate and register every category; commit outputs to DVC."""
    params = load_params(params_path)
    logger = get_run_logger()
    prepare_task(params_path)
    run_validation(params_path)
    categories = list(params.data.categories)
    rows = train_categories.with_options(task_runner=task_runner(params))(params_path, categories)
    create_table_artifact(key="adps-metrics", table=rows, description="Test metrics and registry version per category")
    succeeded = [r["category"] for r in rows if r["status"] == "ok"]
    dvc_commit_task(dvc_targets(succeeded))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise AdpsError("categories failed: " + ", ".join(f"{r['category']} ({r['status']})" for r in failed))
    logger.info("pipeline done: %s", ", ".join(succeeded))
    return rows
