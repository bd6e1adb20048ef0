"""The model registry: the pyfunc model, versions, the challenger and champion aliases, promotion."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adps import paths
from adps.config import METRIC_NAMES, Params
from adps.errors import AdpsError
from adps.evaluation.reports import pixel_coverage
from adps.files import write_json_atomically
from adps.serving_contract import ACCEPTED_INPUT, OUTPUT_COLUMNS, OUTPUT_DESCRIPTION
from adps.tracking.connection import TrackingUnavailable, check_reachable, connect, tracking_uri, use_experiment
from adps.tracking.lineage import (
    MANIFEST_ARTIFACT,
    PACKAGE_DIR,
    SERVING_CODE,
    data_changes,
    data_manifest,
    file_md5,
    git_tags,
    manifest_digest,
    model_hash,
    params_changes,
)
from adps.tracking.runs import log_run_contents, logged_params

logger = logging.getLogger(__name__)


CHAMPION, CHALLENGER = "champion", "challenger"


SERVED_PACKAGES = (  # what the served model imports; timm builds the EfficientNet-Lite architecture
    "torch", "torchvision", "timm", "numpy", "pillow", "pandas", "scipy", "scikit-learn", "pydantic", "pyyaml",
    "tqdm", "matplotlib", "mlflow",
)  # fmt: skip
LOCK_FILE = PACKAGE_DIR.parent / "requirements.lock"


def pip_requirements(lock: Path = LOCK_FILE) -> list[str]:
    """The served packages pinned as the project's lock pins them (the installed version when there is no lock)."""
    pins = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return [f"{name}=={pins.get(name) or importlib.metadata.version(name)}" for name in SERVED_PACKAGES]


def model_name(category: str) -> str:
    return f"adps-{category}"


def log_pyfunc(params: Params, category: str):
    """Log the deployable model (psm.pt + thresholds.json) as a pyfunc with a signature."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=None,  # the model reads every request shape itself (adps/serving.py): MLflow would drop columns
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_COLUMNS.items()]),
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
            code_paths=[str(PACKAGE_DIR)],  # the whole package: a process that loaded the model may start others
            signature=signature,
            pip_requirements=pip_requirements(),
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


IMAGE_METRICS = ("image_auroc", "image_ap")
FALLBACK_METRIC = "image_auroc"  # the promotion metric of a category whose defects have no masks


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
    if new is None and metric not in IMAGE_METRICS:  # labelled by image only: no pixel metric to compare
        logger.info("%s: version %s has no %s (no defect masks); comparing %s", name, version, metric, FALLBACK_METRIC)
        metric = FALLBACK_METRIC
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
        "model_kind": str(metrics.get("kind", "adps")),
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
    client.update_registered_model(name, description=model_description(category))
    client.set_registered_model_alias(name, CHALLENGER, version)
    maybe_promote(client, params, name, version)
    return record_registration(client, params, category, version, run.info.run_id, created=True)


MODEL_DESCRIPTION = """ADPS anomaly detector for product category **{category}** (Asymmetric Distillation
Post-Segmentation, IEEE TNNLS 2024), trained and registered by the ADPS pipeline.

**Input**: {accepted_input}. Any other shape is answered with HTTP 400 saying what to send.

**Output**: {output}.

**Call it**: `mlflow models serve -m models:/adps-{category}@champion --env-manager local -p 5001`, then
POST `{{"instances": ["<base64>"]}}` to `/invocations`; or
`mlflow.pyfunc.load_model("models:/adps-{category}@champion").predict(frame)`; or
`adps predict --model models:/adps-{category}@champion --input DIR --output OUT`. The bundle's
`model_dir` also holds `model.onnx` (ONNX Runtime without PyTorch; preprocessing and thresholds in
its metadata).

**Promote** a version by moving the `champion` alias on its page, or `adps promote -c {category} --version V`.
Each version's description compares it with the champion of the time it was registered.
"""


def model_description(category: str) -> str:
    """The registered model's description: what it takes and returns (the serving contract), how to call it."""
    return MODEL_DESCRIPTION.format(category=category, accepted_input=ACCEPTED_INPUT, output=OUTPUT_DESCRIPTION)


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
    lines += ["", pixel_coverage(metrics), "", *kind_lines(metrics)]
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
        f"- thresholds (validation split): image {number(metrics.get('image_threshold'))} "
        f"(chosen on {metrics.get('image_threshold_on') or 'synthetic anomalies'}), "
        f"pixel {number(metrics.get('pixel_threshold'))}",
        "",
        f"**Reproduce**: `git checkout {commit} && dvc pull && dvc repro register@{category}`",
        "",
        "The run's artifacts hold `plots/curves.png` (ROC and PR), `plots/heatmaps.png` (best and worst test "
        "images: image | ground truth | map | predicted mask) and `model.onnx`.",
    ]
    return "\n".join(lines)


def kind_lines(metrics: dict[str, Any]) -> list[str]:
    """The shipped model kind, why, and each kind the model holds on the same test split."""
    kind = metrics.get("kind", "adps")
    lines = [f"**Model kind**: {kind} ({metrics.get('kind_choice', 'model.kind')})."]
    held = metrics.get("kinds", {})
    if len(held) > 1:
        lines += ["", "| kind | test image AUROC | test image AP | validation image AUROC (real defects) |"]
        lines.append("|---|---|---|---|")
        for name, row in held.items():
            shown = f"**{name}** (shipped)" if name == kind else name
            lines.append(
                f"| {shown} | {number(row.get('image_auroc'))} | {number(row.get('image_ap'))} "
                f"| {number(row.get('val_image_auroc'))} |"
            )
    return lines


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
