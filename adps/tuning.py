"""Optuna tuning of the loss, learning-rate, score and threshold parameters of one category.

Each trial trains with a reduced budget (``tune.budget``) in its own temp folder and is scored on
the validation split only (held-out normal images + synthetic anomalies with their own seed); the
test split is never read. Intermediate values after every PSM epoch feed the pruner; failed trials
are recorded as failed. Workers are processes sharing one study through ``tune.storage``; running
again with the same study name continues it. MLflow gets a parent run per study and a nested run
per trial; the parent holds the best params, parameter importances and the optimisation history.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml

from adps import paths, stages, tracking
from adps.config import (
    CategoricalDistribution,
    FloatDistribution,
    Params,
    flatten_params,
    flatten_tree,
    load_params,
    nest_dotted,
    override_params,
    params_from_dict,
    params_path_or_project,
    renamed_key,
    set_dotted,
)
from adps.data.splits import category_splits
from adps.errors import AdpsError
from adps.evaluation.metrics import decision_metrics, detection_metrics, flat
from adps.evaluation.predictions import Predictions, validation_predictions
from adps.evaluation.thresholds import choose_thresholds
from adps.files import write_text_atomically
from adps.model.network import ADPS
from adps.runtime import shared_threads
from adps.training.checkpoints import load_model

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's parent MLflow run
SCHEMA_ATTEMPTS = 5

logger = logging.getLogger(__name__)


def study_name(params: Params, category: str) -> str:
    return f"{params.tune.study_name}-{category}"


def storage_url(params: Params) -> str:
    """``tune.storage`` as SQLAlchemy takes it (workers and temp dirs share it): :func:`adps.paths.sqlalchemy_url`."""
    return paths.sqlalchemy_url(params.tune.storage, params.root)


def rdb_storage(params: Params, category: str) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats: a trial whose process was killed is marked FAIL (and its MLflow
    run FAILED) by the next worker of the study once its heartbeat is ``2 x tune.heartbeat_seconds`` old.

    Processes (or hosts) opening a fresh database at the same moment race to create its tables; the
    loser retries.
    """
    name, beat = study_name(params, category), params.tune.heartbeat_seconds
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                storage_url(params),
                heartbeat_interval=beat,
                grace_period=2 * beat,
                heartbeat_stale_trial_callback=lambda _study, trial: tracking.fail_trial_run(name, trial.number),
            )
        except sqlalchemy.exc.SQLAlchemyError as err:
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise AdpsError(
                    f"cannot open the Optuna storage {params.tune.storage} ({err}); check tune.storage"
                ) from err
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def load_study(params: Params, category: str) -> optuna.Study:
    """Create the category's study, or load it when it exists (a rerun continues it)."""
    cfg = params.tune
    sampler = (
        optuna.samplers.TPESampler(seed=cfg.sampler_seed)
        if cfg.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=cfg.sampler_seed)
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.pruner_warmup_epochs)
        if cfg.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=rdb_storage(params, category),
        study_name=study_name(params, category),
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def start_study(params: Params, category: str) -> str:
    """Create the category's study or join it (another host may be starting it this moment); its parent run id.

    Exactly one process creates a study: it enqueues the baseline trial (the params file's values) and
    creates the study's parent MLflow run, whose id it stores on the study. Every other process joins
    and reads that id: however many hosts start at once, one baseline trial and one parent run.
    """
    name = study_name(params, category)
    tracking.use_experiment(params)
    try:
        study = optuna.create_study(storage=rdb_storage(params, category), study_name=name, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        return joined_parent_run(params, category)
    parent = tracking.study_parent_run(params, name, category)
    study.set_user_attr(PARENT_RUN_ATTR, parent)  # before any trial: a study with trials and no id predates this
    study.enqueue_trial(current_values(params), user_attrs={"baseline": True})
    return parent


def joined_parent_run(params: Params, category: str, wait_seconds: float = 120) -> str:
    """The parent run of a study another process created (waiting while its creator sets it up)."""
    study = load_study(params, category)
    deadline = time.monotonic() + wait_seconds
    while (parent := study.user_attrs.get(PARENT_RUN_ATTR)) is None:
        if study.trials:  # a study started before parent runs were stored on it: find (or make) its run
            parent = tracking.study_parent_run(params, study.study_name, category)
            study.set_user_attr(PARENT_RUN_ATTR, parent)
        elif time.monotonic() > deadline:
            raise AdpsError(
                f"study {study.study_name} in {params.tune.storage} exists but its creator never finished starting "
                f"it (no parent run after {wait_seconds:.0f} s): rerun, or delete the empty study with "
                f"`optuna delete-study --study-name {study.study_name} --storage <url>`"
            )
        else:
            time.sleep(0.5)
    return parent


def suggest(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """One value per ``tune.space`` entry."""
    values = {}
    for key, dist in params.tune.space.items():
        if isinstance(dist, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, list(dist.choices))
        elif isinstance(dist, FloatDistribution):
            values[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
        else:
            values[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log)
    return values


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    """The params of one trial: sampled values and the reduced training budget."""
    budget = params.tune.budget
    return override_params(
        params,
        {
            **values,
            "train.distill.epochs": budget.distill_epochs,
            "train.psm.epochs": budget.psm_epochs,
            "runtime.progress": False,
        },
    )


def decision_f1(pred: Predictions, params: Params) -> float:
    """Mean of image and pixel F1 on half of the validation images, thresholds chosen on the other half.

    The validation set holds each held-out image twice (normal, then with a synthetic anomaly); both
    copies of an image fall in the same half.
    """
    n = len(pred.labels) // 2
    image_index = np.arange(len(pred.labels)) % max(1, n)
    calib, held = image_index % 2 == 0, image_index % 2 == 1
    if not held.any():
        held = calib
    calib_pred, held_pred = pred.subset(calib), pred.subset(held)
    t = choose_thresholds(calib_pred.scores, calib_pred.labels, calib_pred.maps, calib_pred.masks, params.threshold)
    image = decision_metrics(held_pred.labels.astype(bool), held_pred.scores >= t["image"])["f1"]
    maps, masks = flat(held_pred.maps), flat(held_pred.masks, bool)
    pixel = decision_metrics(masks, maps >= t["pixel"])["f1"]
    return (image + pixel) / 2


def validation_value(model, params: Params, category: str) -> float:
    """The tuning objective of a model, on the validation split's held-out normals and synthetic anomalies
    (real validation defects, if any, are left to `adps evaluate`: they choose the kind and the threshold)."""
    import torch

    device = next(model.parameters()).device
    model.eval().set_scoring(**params.score.model_dump(), kind=ADPS)  # the trials tune the ADPS parts
    _, val, _ = category_splits(params, category)
    with torch.no_grad():
        pred = validation_predictions(model, val, params, device).synthetic_split()
    if not pred.all_finite():  # diverged training: NaN lets the pruner stop the trial
        return float("nan")
    if params.tune.objective == "decision_f1":
        return decision_f1(pred, params)
    metrics = detection_metrics(
        pred.scores, pred.labels, pred.maps, pred.masks, params.evaluation.aupro_fpr_limit, pred.masked
    )
    value = metrics[params.tune.objective]
    return 0.0 if value is None or math.isnan(value) else float(value)


TRIAL_FOLDER_PREFIX = "adps-trial-"


@contextlib.contextmanager
def trial_project(params: Params) -> Iterator[Params]:
    """The trial's params rooted in a temp folder that sees the project's data (linked): models apart.

    The folder's name carries the worker's pid, so a folder left by a killed worker is recognised and
    removed by the next ``adps tune`` (:func:`remove_dead_trial_folders`).
    """
    with tempfile.TemporaryDirectory(prefix=f"{TRIAL_FOLDER_PREFIX}{os.getpid()}-") as tmp:
        (Path(tmp) / paths.DATA_ROOT).symlink_to(params.root / paths.DATA_ROOT)
        yield params.at(tmp)


def remove_dead_trial_folders() -> None:
    """Delete trial folders of worker processes that no longer exist (killed runs)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{TRIAL_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(TRIAL_FOLDER_PREFIX) :].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Objective:
    """Train one category with the trial's params, report validation values per epoch, return the last."""

    def __init__(self, params: Params, category: str, parent_run_id: str):
        self.params, self.category, self.parent_run_id = params, category, parent_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest(trial, self.params)
        params = trial_params(self.params, values)
        with tracking.trial_run(
            self.parent_run_id, trial.study.study_name, trial.number, self.category, values
        ) as outcome:
            try:
                outcome["value"] = self.train_and_score(trial, params)
                outcome["state"] = "COMPLETE"
                return outcome["value"]
            except optuna.TrialPruned:
                outcome["state"] = "PRUNED"
                raise

    def train_and_score(self, trial: optuna.Trial, params: Params) -> float:
        def report(epoch: int, model) -> None:
            value = validation_value(model, params, self.category)
            trial.report(value, epoch)
            model.train()
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at PSM epoch {epoch} (validation value {value:.4f})")

        with trial_project(params) as own:
            stages.distill(own, self.category)
            stages.psm(own, self.category, on_epoch_end=report)
            model, _ = load_model(paths.psm_checkpoint(own, self.category))
            return validation_value(model, own, self.category)


def optimize_worker(
    raw_params: dict[str, Any], category: str, n_trials: int, parent_run_id: str, project_root: str
) -> None:
    """One worker process (its entry point): run ``n_trials`` trials of the shared study."""
    params = params_from_dict(raw_params, root=project_root)
    log_to_stderr(params.runtime.log_level)
    tracking.connect(params)
    study = load_study(params, category)
    objective = Objective(params, category, parent_run_id)
    study.optimize(objective, n_trials=n_trials, timeout=params.tune.timeout, catch=(Exception,))


def log_to_stderr(level: str) -> None:
    """Show this package's log records on stderr in a worker process (the process's only handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package = logging.getLogger("adps")
    package.addHandler(handler)
    package.setLevel(level)


def current_values(params: Params) -> dict[str, Any]:
    """The params file's values of the tuned parameters (those that lie inside the search space)."""
    flat = flatten_params(params, include_tune=False)
    values = {}
    for key, dist in params.tune.space.items():
        value = flat[key]
        if isinstance(dist, CategoricalDistribution):
            inside = value in dist.choices
        else:
            inside = value is not None and dist.low <= value <= dist.high
        if inside:
            values[key] = value
    return values


def worker_threads(params: Params, workers: int) -> int:
    """Torch threads of each of ``workers`` processes: ``runtime.threads``, or when 0 the cores shared out."""
    return params.runtime.threads or shared_threads(workers)


def run_workers(params: Params, category: str, n_trials: int, workers: int, parent_id: str) -> None:
    """Share ``n_trials`` among ``workers`` processes on the shared study and wait for them."""
    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    threaded = override_params(params, {"runtime.threads": worker_threads(params, workers)})
    common = (threaded.model_dump(mode="json"), category)
    rest = (parent_id, str(params.root))
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=optimize_worker, args=(*common, n, *rest)) for n in shares if n]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(p.exitcode for p in processes):
        raise AdpsError(f"a tuning worker of {study_name(params, category)} crashed; see the log above")


def best_values(study: optuna.Study) -> dict[str, Any]:
    try:
        return dict(study.best_trial.params)
    except ValueError as err:
        raise AdpsError(f"study {study.study_name} has no completed trial yet: {err}") from err


def dvc_exp_command(best: dict[str, Any]) -> str:
    return "dvc exp run " + " ".join(f"-S '{k}={v}'" for k, v in best.items())


def summarise_study(params: Params, category: str, parent_id: str) -> dict[str, Any]:
    """Best params file, trials table, and the parent run's best params, importances and history plot."""
    study = load_study(params, category)
    best = best_values(study)
    override_params(params, best)  # the best params are valid against the schema
    write_text_atomically(paths.best_params_file(params, category), yaml.safe_dump(nest_dotted(best), sort_keys=True))
    trials = study.trials_dataframe()
    write_text_atomically(paths.tuning_dir(params, category) / "trials.csv", trials.to_csv(index=False))
    tracking.log_study_summary(
        parent_id,
        best,
        study.best_value,
        paths.best_params_file(params, category),
        importances(study),
        history_figure(study),
    )
    states = trials["state"].value_counts().to_dict() if not trials.empty else {}
    baseline = next((t.value for t in study.trials if t.user_attrs.get("baseline")), None)
    return {
        "study": study.study_name,
        "n_trials": len(study.trials),
        "states": states,
        "baseline_value": baseline,
        "best_value": study.best_value,
        "best_params": best,
        "best_params_file": str(paths.best_params_file(params, category)),
        "dvc_exp_run": dvc_exp_command(best),
    }


def importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA parameter importances, or None when fewer than two trials completed or they cannot be told apart."""
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(completed) < 2:
        return None
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as err:  # e.g. every trial had the same value
        logger.warning("no parameter importances: %s", err)
        return None


def history_figure(study: optuna.Study):
    """Optuna's optimisation-history plot as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_optimization_history

    return plot_optimization_history(study).figure


def tune(params: Params, category: str, n_trials: int | None = None, workers: int = 1) -> dict[str, Any]:
    """Run ``n_trials`` (default ``tune.n_trials``) more trials of the category's study on ``workers`` processes."""
    n_trials = params.tune.n_trials if n_trials is None else n_trials
    if n_trials < 1 or workers < 1:
        raise AdpsError(f"trials and workers must be at least 1 (got trials={n_trials}, workers={workers})")
    category_splits(params, category)  # unknown category: fail before starting anything
    if params.model.kind == "memory_bank":
        raise AdpsError(
            "model.kind is memory_bank: nothing is trained, so there is nothing for `adps tune` to tune (it tunes "
            "the ADPS parts' losses, learning rates, score and thresholds); set model.kind to auto, adps or "
            "adps+memory_bank"
        )
    if not params.tune.space:
        raise AdpsError("tune.space is empty: name the parameters to tune in params.yaml (see its tune.space)")
    tracking.connect(params)
    remove_dead_trial_folders()
    parent_id = start_study(params, category)
    optuna.storages.fail_stale_trials(load_study(params, category))  # trials of killed workers -> FAIL
    run_workers(params, category, n_trials, workers, parent_id)
    return summarise_study(params, category, parent_id)


def apply_best_params(params_path: Path | None, category: str) -> dict[str, Any]:
    """Write the category's best params into the params file, keeping its comments and layout."""
    from ruamel.yaml import YAML

    params_path = params_path_or_project(params_path)
    params = load_params(params_path)
    best_file = paths.best_params_file(params, category)
    if not best_file.is_file():
        raise AdpsError(f"no {best_file}: run `adps tune --category {category}` first")
    best = yaml.safe_load(best_file.read_text())
    current = flatten_params(params)
    if unknown := [k for k in flatten_tree(best) if k not in current]:
        named = ", ".join(f"'{k}'" + (f" (now '{renamed_key(k)}')" if renamed_key(k) else "") for k in unknown)
        raise AdpsError(
            f"{best_file} names parameters that do not exist: {named}; run `adps tune -c {category}` again."
        )
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = yaml_rt.load(params_path.read_text())
    flat = {k: v for k, v in flatten_tree(best).items() if current.get(k) != v}  # touch only what changes
    for key, value in flat.items():
        set_dotted(document, key, value)
    from io import StringIO

    buffer = StringIO()
    yaml_rt.dump(document, buffer)
    params_from_dict(yaml.safe_load(buffer.getvalue()), source=str(params_path))  # still valid
    write_text_atomically(params_path, buffer.getvalue())
    return {"params": str(params_path), "applied": flat}
