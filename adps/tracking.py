"""MLflow tracking and registry: one run per category, the pyfunc model, aliases and promotion.

The registered model ``adps-<category>`` gets a new version per changed model (the same weights
and thresholds registered again create no duplicate), with alias ``challenger``; ``champion`` is
moved by the MLflow UI, by :func:`promote`, or automatically (``registry.auto_promote``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adps import paths
from adps.config import METRIC_NAMES, Params, flatten_params
from adps.errors import AdpsError
from adps.files import file_sha256, waiting_lock, write_json_atomically

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MANIFEST_ARTIFACT = "data/manifest.json"  # sha256 of every file of the category's dataset
SERVING_CODE = Path(__file__).with_name("serving.py")
PIP_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",  # the EfficientNet-Lite architecture (its weights are inside psm.pt)
    "numpy==2.4.6",
    "pillow==13.0.0",
    "pandas==3.1.1",
    "scipy",
    "scikit-learn==1.9.1",
    "pydantic==2.14.4",
    "pyyaml",
    "tqdm",
    "mlflow==3.17.2",
]


class TrackingUnavailable(AdpsError):
    """The MLflow tracking server cannot be reached."""


def model_name(category: str) -> str:
    return f"adps-{category}"


def tracking_uri(params: Params) -> str:
    """``MLFLOW_TRACKING_URI`` or ``tracking.uri``; relative sqlite paths made absolute (DVC temp dirs)."""
    return paths.absolute_sqlite_url(os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri, params.root)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with what to do, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({err}). Start it (`make up`) or unset "
            "MLFLOW_TRACKING_URI to use the local sqlite store; local models and reports are untouched."
        ) from err


def connect(params: Params, create: bool = True):
    """Point MLflow at the tracking store and return a client (see :func:`open_client`)."""
    from mlflow.exceptions import MlflowException

    try:
        return open_client(params, create)
    except MlflowException as err:
        raise AdpsError(f"cannot use the MLflow store {tracking_uri(params)}: {err.message}") from err


def open_client(params: Params, create: bool = True):
    """Point MLflow at the tracking store and return a client.

    ``create=False`` (reading the registry, promoting): a local sqlite store that does not exist is
    an error, never a new empty database.
    """
    import mlflow

    uri = tracking_uri(params)
    check_reachable(uri)
    if not create:
        check_store_exists(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(uri)
    with waiting_lock(Path(uri.removeprefix("sqlite:///") + ".lock")):  # the first client creates the tables:
        return mlflow.MlflowClient(uri)  # one process at a time (e.g. tuning started on two hosts at once)


def check_store_exists(uri: str) -> None:
    """A local sqlite store must exist before anything is read from it."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise AdpsError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: nothing is registered there. Run `adps register` "
            "(or `make run`) in the project first, run the command inside the project, or set MLFLOW_TRACKING_URI."
        )


def use_experiment(params: Params) -> None:
    """Make ``tracking.experiment`` the active experiment, creating it when missing.

    With a local store its artifacts go to ``<project root>/mlruns`` whatever the working directory
    (MLflow's default is the creating process's cwd); a server decides for itself (proxied artifacts).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = params.tracking.experiment
    if not tracking_uri(params).startswith(("http://", "https://")) and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=(params.root / "mlruns").as_uri())
        except MlflowException as err:  # another process created it first
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else ""


def model_hash(params: Params, category: str) -> str:
    """Identity of a deployable model: its weights, its thresholds and the code that serves them.

    The code counts because the registered model bundles it: a change to how images are read or
    scored must register a new version, not leave the old code serving under the old one.
    """
    parts = [file_md5(paths.psm_checkpoint(params, category)), file_md5(paths.thresholds_file(params, category))]
    return hashlib.sha256("".join([*parts, served_code_digest()]).encode()).hexdigest()[:32]


PACKAGE_DIR = Path(__file__).parent
PACKAGE_DATA = ("telemetry.env",)  # read by adps/__init__.py at import


def served_code() -> list[Path]:
    """The package files the served model runs: serving.py, every ``adps`` module it imports (at any depth,
    in functions too) with their packages' ``__init__.py``, and the package data they read; sorted."""
    from modulefinder import ModuleFinder

    finder = ModuleFinder(path=[str(PACKAGE_DIR.parent)])  # only the project: nothing else is scanned
    finder.run_script(str(SERVING_CODE))
    files = {Path(m.__file__) for name, m in finder.modules.items() if name.split(".")[0] == "adps" and m.__file__}
    return sorted(files | {SERVING_CODE} | {PACKAGE_DIR / name for name in PACKAGE_DATA})


def served_code_digest() -> str:
    digest = hashlib.sha256()
    for path in served_code():
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def bundle_code(folder: Path) -> Path:
    """Copy :func:`served_code` into ``folder/adps`` (the package tree the model loads); returns that folder."""
    target = folder / PACKAGE_DIR.name
    for path in served_code():
        (target / path.relative_to(PACKAGE_DIR)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.relative_to(PACKAGE_DIR))
    return target


def git_tags(root: Path) -> dict[str, str]:
    """The commit, and whether source or params differ from it (the pipeline's own outputs do not count)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    outputs = [f":(exclude){path}" for path in paths.pipeline_outputs()]
    changed = git("status", "--porcelain", "--", ".", *outputs)
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(changed)).lower() if commit else "unknown"}


def data_manifest(params: Params, category: str) -> dict[str, str]:
    """sha256 of every file of the category's dataset, by path relative to the category folder."""
    folder = paths.category_dir(params, category)
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_digest(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def data_changes(old: dict[str, str], new: dict[str, str]) -> str:
    """Files added, removed and changed per folder, e.g. ``+5 train/good, +2 test/anomalous``."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(set(old) | set(new)):
        kind = "+" if path not in old else "-" if path not in new else "changed " if old[path] != new[path] else None
        if kind:
            folder = str(Path(path).parent)
            counts.setdefault(folder, {}).setdefault(kind, 0)
            counts[folder][kind] += 1
    return (
        ", ".join(f"{kind}{n} {folder}" for folder, kinds in counts.items() for kind, n in kinds.items()) or "unchanged"
    )


def params_changes(old: dict[str, str], new: dict[str, str], shown: int = 8) -> str:
    """Params that differ from the previous version's run: ``key old -> new``."""
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"`{k}` {old.get(k, '-')} -> {new.get(k, '-')}" for k in changed[:shown]]
    more = [f"{len(changed) - shown} more"] if len(changed) > shown else []
    return "; ".join(parts + more) or "unchanged"


def what_changed(client, name: str, manifest: dict[str, str], logged_params: dict[str, str], commit: str) -> list[str]:
    """Markdown lines comparing a new version's data, params and code with the latest registered version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        previous = client.get_model_version(name, latest_version(client, name))
    except (MlflowException, ValueError):  # no version yet
        return ["**What changed**: first version of this model."]
    try:
        old_manifest = mlflow.artifacts.load_dict(f"runs:/{previous.run_id}/{MANIFEST_ARTIFACT}")
        data = data_changes(old_manifest, manifest)
    except (MlflowException, OSError):
        data = f"version {previous.version} has no data manifest to compare with"
    old_run = client.get_run(previous.run_id)
    old_commit = old_run.data.tags.get("git_commit", "unknown")
    return [
        f"**What changed since version {previous.version}**",
        f"- data: {data}",
        f"- params: {params_changes(old_run.data.params, logged_params)}",
        f"- code: {'unchanged' if old_commit == commit else f'git {old_commit} -> {commit}'}",
    ]


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


def log_pyfunc(params: Params, category: str):
    """Log the deployable model (psm.pt + thresholds.json) as a pyfunc with a signature."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=None,  # the model reads every request shape itself (adps/serving.py): MLflow would drop columns
        outputs=Schema(
            [
                ColSpec("string", "name"),
                ColSpec("double", "score"),
                ColSpec("boolean", "is_anomalous"),
                ColSpec("double", "threshold"),
                ColSpec("string", "regions"),
                ColSpec("string", "map_png"),
                ColSpec("string", "error"),
            ]
        ),
        params=ParamSchema([ParamSpec("return_map", "boolean", False)]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "model_dir"
        bundle.mkdir()
        for path in (
            paths.psm_checkpoint(params, category),
            paths.thresholds_file(params, category),
            paths.onnx_file(params, category),
        ):
            if path.is_file():  # model.onnx: present when `adps export` ran (always in dvc.yaml and the flow)
                shutil.copy2(path, bundle / path.name)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"model_dir": str(bundle)},
            code_paths=[str(bundle_code(Path(tmp) / "code"))],
            signature=signature,
            pip_requirements=PIP_REQUIREMENTS,
        )


def find_version(client, name: str, digest: str):
    """An existing version of ``name`` holding the model with hash ``digest``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("model_hash") == digest), None)


def latest_version(client, name: str) -> str:
    return str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))


def version_metric(client, name: str, version: str, metric: str) -> float | None:
    value = client.get_model_version(name, version).tags.get(metric)
    return None if value in (None, "", "None") else float(value)


def current_champion(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def maybe_promote(client, params: Params, name: str, version: str) -> bool:
    """Make ``version`` champion when there is none, or when auto-promotion says it wins."""
    champion = current_champion(client, name)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True
    if not params.registry.auto_promote or champion == version:
        return False
    metric = params.registry.promote_metric
    new, old = version_metric(client, name, version, metric), version_metric(client, name, champion, metric)
    if new is not None and (old is None or new > old + params.registry.min_delta):
        client.set_registered_model_alias(name, CHAMPION, version)
        logger.info("%s: version %s (%s=%.4f) replaces champion %s (%s)", name, version, metric, new, champion, old)
        return True
    return False


def register(params: Params, category: str) -> dict[str, Any]:
    """Log the category's run and model, register it as ``adps-<category>`` with alias challenger.

    A tracking server lost half-way is a :class:`TrackingUnavailable` error; the rerun registers the
    model once (a version created before the loss is found by its hash and completed).
    """
    import requests
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    try:
        return log_and_register(params, category)
    except (MlflowException, requests.RequestException, ConnectionError) as err:
        try:
            check_reachable(uri)
        except TrackingUnavailable:
            raise TrackingUnavailable(
                f"lost the MLflow tracking server {uri} while registering {category} ({type(err).__name__}). "
                f"Start it again and rerun `adps register -c {category}`; local models and reports are untouched."
            ) from err
        raise AdpsError(f"MLflow refused the registration of {category}: {err}") from err


def log_and_register(params: Params, category: str) -> dict[str, Any]:
    import mlflow

    metrics = json.loads(paths.metrics_file(params, category).read_text())
    client = connect(params)
    name, digest = model_name(category), model_hash(params, category)
    existing = find_version(client, name, digest)
    if existing is not None:
        logger.info("%s: model unchanged, already version %s", name, existing.version)
        aliases = client.get_model_version(name, existing.version).aliases  # search results carry none
        if not aliases and str(existing.version) == latest_version(client, name):
            client.set_registered_model_alias(name, CHALLENGER, existing.version)  # finish an interrupted run
            maybe_promote(client, params, name, str(existing.version))
        return record_registration(client, params, category, existing.version, existing.run_id, created=False)
    use_experiment(params)
    manifest = data_manifest(params, category)
    tags = {
        "category": category,
        "teacher_weights": str(metrics.get("teacher_weights")),
        "model_hash": digest,
        "model_md5": file_md5(paths.psm_checkpoint(params, category)),  # = DVC's md5 of psm.pt
        "data_sha256": manifest_digest(manifest),
        **git_tags(params.root),
    }
    changes = what_changed(client, name, manifest, logged_params(params), tags["git_commit"])
    description = version_description(client, params, category, metrics, tags, changes)  # before any promotion
    with mlflow.start_run(run_name=f"{category}", tags={**tags, "mlflow.note.content": description}) as run:
        log_run_contents(run.info.run_id, params, category, metrics)
        mlflow.log_dict(manifest, MANIFEST_ARTIFACT)
        info = log_pyfunc(params, category)
    version_tags = {
        **tags,
        **{k: str(metrics.get(k)) for k in METRIC_NAMES},
    }
    version = str(mlflow.register_model(info.model_uri, name, tags=version_tags).version)
    client.update_model_version(name, version, description=description)
    client.update_registered_model(name, description=MODEL_DESCRIPTION.format(category=category))
    client.set_registered_model_alias(name, CHALLENGER, version)
    maybe_promote(client, params, name, version)
    return record_registration(client, params, category, version, run.info.run_id, created=True)


MODEL_DESCRIPTION = """ADPS anomaly detector for product category **{category}** (Asymmetric Distillation
Post-Segmentation, IEEE TNNLS 2024), trained and registered by the ADPS pipeline.

**Input**, one image per row: column `image` = the image file's bytes, base64 (PNG, JPEG, TIFF, BMP), in
`dataframe_split` or `dataframe_records`, or a bare list of base64 strings as `instances` or `inputs`. Any
other shape is answered with HTTP 400 saying what to send (never an empty answer).

**Output** per image: `score`; `is_anomalous` (score >= the image threshold chosen on the validation
split); `threshold`; `regions` (JSON list of connected regions above the pixel threshold: x, y, width,
height, area in input-image pixels, peak score); `map_png` (base64 16-bit PNG, with param
`return_map: true`); `error` (per row: the other rows are still answered).

**Call it**: `mlflow models serve -m models:/adps-{category}@champion --env-manager local -p 5001`, then
POST `{{"dataframe_split": {{"columns": ["image"], "data": [["<base64>"]]}}}}` to `/invocations`; or
`mlflow.pyfunc.load_model("models:/adps-{category}@champion").predict(frame)`; or
`adps predict --model models:/adps-{category}@champion --input DIR --output OUT`. The bundle's
`model_dir` also holds `model.onnx` (ONNX Runtime without PyTorch; preprocessing and thresholds in
its metadata).

**Promote** a version by moving the `champion` alias on its page, or `adps promote -c {category} --version V`.
Each version's description compares it with the champion of the time it was registered.
"""


def version_description(
    client, params: Params, category: str, metrics: dict[str, Any], tags: dict[str, str], changes: list[str]
) -> str:
    """Markdown for a new version: its test metrics beside the champion's, what changed, lineage, how to reproduce."""
    name = model_name(category)
    champion = current_champion(client, name)
    before = {k: version_metric(client, name, champion, k) for k in METRIC_NAMES} if champion else {}
    title = f"vs champion (version {champion})" if champion else "(no champion yet: this version becomes it)"
    lines = [f"### {category}: test metrics {title}", "", "| metric | this version | champion | difference |"]
    lines.append("|---|---|---|---|")
    for key in METRIC_NAMES:
        new, old = metrics.get(key), before.get(key)
        difference = f"{new - old:+.4f}" if isinstance(new, float) and old is not None else ""
        lines.append(f"| {key} | {number(new)} | {number(old)} | {difference} |")
    registry, commit = params.registry, tags.get("git_commit", "unknown")
    dirty = " (source or params differed from it)" if tags.get("git_dirty") == "true" else ""
    lines += [
        "",
        f"Promotion metric `{registry.promote_metric}`; auto-promotion "
        f"{'on (min delta ' + str(registry.min_delta) + ')' if registry.auto_promote else 'off: promote by hand'}.",
        "",
        *changes,
        "",
        "**Lineage**",
        f"- teacher weights: {tags.get('teacher_weights')}",
        f"- code: git {commit}{dirty}",
        f"- data: sha256 {tags['data_sha256']} (every file in the run's `{MANIFEST_ARTIFACT}`); "
        f"model psm.pt md5 {tags['model_md5']} (as in dvc.lock)",
        f"- thresholds (validation split): image {number(metrics.get('image_threshold'))}, "
        f"pixel {number(metrics.get('pixel_threshold'))}",
        "",
        f"**Reproduce**: `git checkout {commit} && dvc pull && dvc repro register@{category}`",
        "",
        "The run's artifacts hold `plots/curves.png` (ROC and PR), `plots/heatmaps.png` (best and worst test "
        "images: image | ground truth | map | predicted mask) and `model.onnx`.",
    ]
    return "\n".join(lines)


def number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def record_registration(
    client, params: Params, category: str, version: str, run_id: str, created: bool
) -> dict[str, Any]:
    name = model_name(category)
    aliases = sorted(client.get_model_version(name, version).aliases)
    record = {
        "model": name,
        "version": str(version),
        "run_id": run_id,
        "aliases": aliases,
        "created": created,
        "uri": f"models:/{name}/{version}",
    }
    write_json_atomically(paths.registry_record(params, category), record)
    return record


def promote(params: Params, category: str, version: str) -> dict[str, Any]:
    """Move the ``champion`` alias of ``adps-<category>`` to ``version``."""
    from mlflow.exceptions import MlflowException

    client = connect(params, create=False)
    name = model_name(category)
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        raise AdpsError(f"{name} has no version {version}: {err.message}") from err
    client.set_registered_model_alias(name, CHAMPION, version)
    return {"model": name, "champion": str(version)}


def load_registered_predictor(uri: str):
    """A Predictor from a ``models:/adps-<C>@alias`` (or ``/version``) URI of the registry."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().predictor
    except MlflowException as err:
        raise AdpsError(f"cannot load {uri} from {mlflow.get_tracking_uri()}: {err.message}") from err
    except (AdpsError, KeyError, OSError) as err:
        raise AdpsError(f"{uri} loaded but its model files are unusable ({err}); register it again.") from err


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
