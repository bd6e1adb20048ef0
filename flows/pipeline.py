"""Prefect flow ``adps-pipeline``: the same stages as dvc.yaml, observable, categories in parallel.

prepare -> per category, in parallel: validate -> distill -> psm -> evaluate -> export -> register
-> a table artifact with one row per category (retrained / updated / unchanged / held back / failed)
-> ``dvc commit`` of exactly the stages this run executed, so ``dvc status`` is clean.

Every stage first asks DVC whether it is stale (:mod:`flows.versioning`); an up-to-date stage is
skipped and shows as ``Unchanged`` (a completed state, with the reason) in the Prefect UI. A
category whose images fail validation is held back (its files named in a markdown artifact) while
the others go on. ``force=True`` runs every stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import task_run
from prefect.states import Completed

from adps import paths, stages
from adps.config import Params, load_params, params_path_or_project
from adps.errors import AdpsError, ValidationFailed
from adps.files import exclusive_lock, file_sha256, tree_digest
from flows import versioning
from flows.cluster import category_runner

TRANSIENT_RETRIES = 2  # for I/O with servers (MLflow, DVC remote); training never retries
UNCHANGED = "Unchanged"  # state name of a stage DVC reports up to date


def stage_task(stage: stages.Stage, retries: int = 0):
    """A Prefect task running one stage of the table ``adps.stages.PIPELINE``, unless DVC says it is up to date.

    Its runs are named like the dvc.yaml stage (``prepare``, ``distill@fabric``). ``params_path`` is
    absolute: the task may run in another process or on another host (a Dask worker).
    """

    def run(params_path: str, category: str | None = None, force: bool = False) -> Any:
        params = load_params(params_path)
        target = versioning.stage_name(stage.name, category)
        if not force:
            reason = versioning.why_stale(params, target)
            if reason is None:
                return Completed(name=UNCHANGED, message=f"{target} is up to date (dvc status): skipped")
            get_run_logger().info("%s is stale: %s", target, reason)
        return stage.run(params, *([category] if category else []))

    def run_name() -> str:
        return versioning.stage_name(stage.name, task_run.parameters.get("category"))

    run.__name__ = run.__qualname__ = stage.name
    return task(
        run,
        name=stage.name,
        task_run_name=run_name,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=10,
    )


RETRIES = {"register": TRANSIENT_RETRIES}  # only the stages that talk to a server retry
prepare_task = stage_task(stages.pipeline_stage("prepare"))
CHAIN_TASKS = {  # one category's stages, in the table's order
    stage.name: stage_task(stage, RETRIES.get(stage.name, 0)) for stage in stages.PIPELINE if stage.per_category
}


@task(name="dvc-commit", cache_policy=NO_CACHE, retries=TRANSIENT_RETRIES, retry_delay_seconds=5)
def dvc_commit_task(params_path: str, targets: list[str]) -> str:
    """Record the outputs of the stages this run executed in dvc.lock (and nothing else)."""
    return versioning.commit(load_params(params_path), targets)


def failures_markdown(category: str, failures: list[dict[str, str]]) -> str:
    """The artifact of a held-back category: every bad file with the check and the reason."""
    rows = "\n".join(f"| `{f['file']}` | {f['check']} | {f['reason']} |" for f in failures)
    return (
        f"# {category}: held back, dataset validation failed\n\nThis category was not trained; the others went on.\n\n"
        f"| file | check | reason |\n|---|---|---|\n{rows}\n"
    )


def ran(future: Any) -> bool:
    """Whether a stage task executed (completed, and not skipped as up to date)."""
    return future.state.is_completed() and future.state.name != UNCHANGED


def validation_error(chain: dict[str, Any]) -> BaseException | None:
    """The exception of a failed ``validate`` task (a :class:`ValidationFailed` names the bad files)."""
    state = chain["validate"].state
    return state.result(raise_on_failure=False) if state.is_failed() else None


def chain_status(chain: dict[str, Any]) -> str:
    """retrained (a training phase ran), updated (only later stages), unchanged, held back or failed."""
    failed = next((name for name, f in chain.items() if not f.state.is_completed()), None)
    if failed == "validate" and isinstance(validation_error(chain), ValidationFailed):
        return "held back"
    if failed:
        return f"failed at {failed}"
    executed = {name for name, f in chain.items() if ran(f)}
    return "retrained" if executed & {"distill", "psm"} else "updated" if executed else "unchanged"


def category_row(
    params: Params, category: str, chain: dict[str, Any], metrics: dict[str, Any], note: str | None = None
) -> dict[str, Any]:
    """One row of the run's table: what happened to the category, its test metrics and registry version
    (``note``: which defect images the pixel metrics stand on, when some have no mask)."""
    status = chain_status(chain)
    row: dict[str, Any] = {
        "category": category,
        "status": status,
        "ran": ", ".join(name for name, f in chain.items() if ran(f)) or "nothing",
    }
    if status == "held back":
        failures = validation_error(chain).failures
        row["held back by"] = ", ".join(sorted({f["file"] for f in failures}))
        create_markdown_artifact(
            key=f"validation-failures-{category}".lower(),
            markdown=failures_markdown(category, failures),
            description=f"Files that held back {category}",
        )
    row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if v is not None})
    if note:
        row["pixel metrics"] = note
    record = paths.registry_record(params, category)
    if record.is_file():
        registered = json.loads(record.read_text())
        row.update(version=registered["version"], aliases=",".join(registered["aliases"]))
    return row


def executed_targets(category: str, chain: dict[str, Any]) -> list[str]:
    return [versioning.stage_name(name, category) for name, f in chain.items() if ran(f)]


@flow(name="adps-categories")
def train_categories(params_path: str, categories: list[str], force: bool = False) -> dict[str, dict[str, Any]]:
    """Every category's chain, in parallel on this flow's task runner.

    Tasks are submitted stage by stage across the categories (every validate, then every distill...):
    a runner slot taken by a task that waits for its upstream then never blocks another category's
    ready task behind it (with threads, a waiting task holds its thread).

    Returns, per category, its table row and the dvc.yaml stages it executed.
    """
    chains: dict[str, dict[str, Any]] = {category: {} for category in categories}
    for name, stage in CHAIN_TASKS.items():
        for category, chain in chains.items():
            upstream = list(chain.values())[-1:]
            chain[name] = stage.submit(params_path, category, force=force, wait_for=upstream)
    wait([f for chain in chains.values() for f in chain.values()])
    params = load_params(params_path)
    metrics, notes = stages.summarize(params)
    return {
        category: {
            "row": category_row(params, category, chain, metrics.get(category, {}), notes.get(category)),
            "ran": executed_targets(category, chain),
        }
        for category, chain in chains.items()
    }


@flow(name="adps-pipeline", log_prints=True)
def adps_pipeline(params_path: str | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Import new data, then validate, train, evaluate and register what changed; commit it to DVC.

    Args:
        params_path: the params file; its folder is the project root (outputs, DVC, locks). Default:
            the params.yaml of the project the working directory lies in.
        force: run every stage, even those DVC reports up to date.
    """
    params_path = str(params_path_or_project(params_path).resolve())
    params = load_params(params_path)
    busy = "another adps-pipeline run is working on this project; this one starts nothing"
    with exclusive_lock(paths.pipeline_lock(params), busy):
        return run_pipeline(params, params_path, force)


def run_pipeline(params: Params, params_path: str, force: bool) -> list[dict[str, Any]]:
    """The body of :func:`adps_pipeline`, run while it holds the project's pipeline lock."""
    logger = get_run_logger()
    before = inputs_digest(params, params_path)
    prepared = prepare_task(params_path, force=force, return_state=True)
    prepared.result()  # a failed import stops the run before any category
    with category_runner(params) as runner:
        results = train_categories.with_options(task_runner=runner)(params_path, list(params.data.categories), force)
    rows = [result["row"] for result in results.values()]
    create_table_artifact(
        key="adps-metrics", table=rows, description="What happened to each category, its test metrics and model version"
    )
    executed = ["prepare"] * (prepared.name != UNCHANGED) + [t for result in results.values() for t in result["ran"]]
    dvc_commit_task(params_path, committable(executed, before, inputs_digest(params, params_path), logger))
    problems = [r for r in rows if r["status"] in ("held back",) or r["status"].startswith("failed")]
    if problems:
        raise AdpsError("; ".join(problem_text(r) for r in problems))
    logger.info("pipeline done: %s", ", ".join(f"{r['category']} {r['status']}" for r in rows))
    return rows


def inputs_digest(params: Params, params_path: str) -> dict[str, str]:
    """What a run reads from outside the pipeline and may change while it runs: the images arriving in
    ``data.import_path`` (new data, ``adps review`` verdicts) and the params file."""
    return {"import": tree_digest(paths.import_dir(params)), "params": file_sha256(Path(params_path))}


def committable(executed: list[str], before: dict[str, str], after: dict[str, str], logger: Any) -> list[str]:
    """The executed stages whose inputs did not change while they ran, for ``dvc commit``.

    ``dvc commit`` records the dependencies as they are at commit time: images that arrived in the import
    folder after ``prepare`` read it would be recorded as imported and never be. So ``prepare`` is left
    uncommitted (stale: the next run imports them); a params file edited during the run leaves every
    stage uncommitted (the next run redoes what it changed).
    """
    if after["params"] != before["params"]:
        logger.warning("the params file changed during the run: nothing committed to DVC; the next run redoes it")
        return []
    if after["import"] != before["import"]:
        logger.warning("new images arrived during the run: prepare left stale, the next run imports them")
        return [target for target in executed if target != "prepare"]
    return executed


def problem_text(row: dict[str, Any]) -> str:
    held = f" by {row['held back by']}" if row.get("held back by") else ""
    return f"{row['category']} {row['status']}{held}"
