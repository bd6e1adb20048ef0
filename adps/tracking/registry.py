"""The model registry: the pyfunc model, versions, the challenger and champion aliases, promotion."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adps import paths
from adps.config import METRIC_NAMES, Params
from adps.data.splits import category_splits
from adps.errors import AdpsError
from adps.evaluation.comparison import score_on_split
from adps.evaluation.reports import pixel_coverage
from adps.files import write_json_atomically
from adps.inference import Predictor
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
    reviewed_images,
    reviewed_line,
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
            paths.reference_file(params, category),
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


def version_metrics(client, name: str, version: str) -> dict[str, float | None]:
    """The headline test metrics recorded on a version's tags (its ``adps evaluate`` metrics, None when absent)."""
    tags = client.get_model_version(name, version).tags
    return {k: None if tags.get(k) in (None, "", "None") else float(tags[k]) for k in METRIC_NAMES}


def current_champion(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Comparison:
    """A new version's headline metrics beside the champion's, and on what they stand.

    ``equal_terms``: both columns come from one scoring run of both models on this version's test split
    (``split`` says which images). Otherwise (no champion, the champion is this model, or it could not be
    scored) this version's ``adps evaluate`` metrics stand beside the champion's tags, and ``basis`` says why.
    """

    champion: str | None
    this_version: dict[str, Any]
    champion_metrics: dict[str, Any]
    basis: str
    equal_terms: bool = False
    split: str = ""
    reason: str = ""  # why not on equal terms, in a few words (the version's tag)

    def tags(self) -> dict[str, str]:
        """What the version records of it (the MLflow UI lists version tags)."""
        split = f"test split of this version: {self.split}" if self.equal_terms else f"no: {self.reason}"
        return {"champion_compared": self.champion or "none", "equal_terms_split": split}


IMAGE_METRICS = ("image_auroc", "image_ap")
FALLBACK_METRIC = "image_auroc"  # the promotion metric of a category whose defects have no masks


def maybe_promote(client, params: Params, name: str, version: str, compared: Comparison | None = None) -> bool:
    """Make ``version`` champion when there is none, or when auto-promotion says it wins.

    It wins on ``compared``'s numbers when they stand on equal terms against this champion (both scored on
    the version's test split), else on the versions' tags (each one's test metrics of its own time).
    """
    champion = current_champion(client, name)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True
    if not params.registry.auto_promote or champion == version:
        return False
    if compared is not None and compared.equal_terms and compared.champion == champion:
        ours, theirs, basis = compared.this_version, compared.champion_metrics, "on equal terms"
    else:
        ours, theirs = version_metrics(client, name, version), version_metrics(client, name, champion)
        basis = "by their test metrics of the time"
    metric = params.registry.promote_metric
    if ours.get(metric) is None and metric not in IMAGE_METRICS:  # labelled by image only: no pixel metric
        logger.info("%s: version %s has no %s (no defect masks); comparing %s", name, version, metric, FALLBACK_METRIC)
        metric = FALLBACK_METRIC
    new, old = ours.get(metric), theirs.get(metric)
    if new is not None and (old is None or new > old + params.registry.min_delta):
        client.set_registered_model_alias(name, CHAMPION, version)
        logger.info(
            "%s: version %s (%s=%.4f) replaces champion %s (%s), %s", name, version, metric, new, champion, old, basis
        )
        return True
    return False


def compare_with_champion(
    client, params: Params, category: str, metrics: dict[str, Any], tags: dict[str, str]
) -> Comparison:
    """This version against the current champion: both scored on this version's test split when the champion is
    another model; the champion's recorded metrics (saying why) when there is none, it is this model, or it
    cannot be loaded or scored here. Never fails the registration."""
    name = model_name(category)
    champion = current_champion(client, name)
    if champion is None:
        return Comparison(None, metrics, {}, "", reason="first version")
    if client.get_model_version(name, champion).tags.get("model_hash") == tags["model_hash"]:
        same = "The champion is this same model: its column is its test metrics as registered."
        return by_tags(client, name, champion, metrics, same, "the champion is this model")
    try:
        return on_equal_terms(params, category, champion, tags["data_sha256"])
    except Exception as err:  # anything wrong with the champion (files, code, input rules): compare as before
        logger.warning("%s: cannot score champion %s on this version's test split: %s", name, champion, err)
        why = (
            f"Not on equal terms: the champion could not be scored on this version's test split "
            f"({type(err).__name__}: {err}). Its column is its test metrics of the time it was registered, "
            "measured on its own test split."
        )
        return by_tags(client, name, champion, metrics, why, "the champion could not be scored")


def on_equal_terms(params: Params, category: str, champion: str, data_sha256: str) -> Comparison:
    """This version (models/<C>) and the champion (from the registry) scored by one function on this
    version's test split (the images ``adps evaluate`` tested on), each at its own thresholds."""
    _, _, test = category_splits(params, category)
    device = params.runtime.device
    holder = load_registered_predictor(f"models:/{model_name(category)}/{champion}").to(device)
    challenger = Predictor.from_dir(paths.model_dir(params, category), device)
    ours, theirs = (score_on_split(model, test, params.evaluation) for model in (challenger, holder))
    normal = sum(sample.label == 0 for sample in test)
    split = f"{len(test)} images ({normal} normal, {len(test) - normal} defect), data sha256 {data_sha256}"
    basis = f"Both scored on this version's test split: {split}; each model at its own thresholds."
    return Comparison(champion, ours, theirs, basis, equal_terms=True, split=split)


def by_tags(client, name: str, champion: str, metrics: dict[str, Any], basis: str, reason: str) -> Comparison:
    """This version's evaluate metrics beside the champion's recorded ones (as registered, on its own test split)."""
    return Comparison(champion, metrics, version_metrics(client, name, champion), basis, reason=reason)


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
    changes += ["", reviewed_line(manifest)]
    compared = compare_with_champion(client, params, category, metrics, tags)  # before any promotion
    description = version_description(params, category, metrics, tags, changes, compared)
    with mlflow.start_run(run_name=f"{category}", tags={**tags, "mlflow.note.content": description}) as run:
        log_run_contents(run.info.run_id, params, category, metrics)
        mlflow.log_dict(manifest, MANIFEST_ARTIFACT)
        info = log_pyfunc(params, category)
    version_tags = {
        **tags,
        **{k: str(metrics.get(k)) for k in METRIC_NAMES},
        **compared.tags(),
        "reviewed_images": str(sum(reviewed_images(manifest).values())),
    }
    version = str(mlflow.register_model(info.model_uri, name, tags=version_tags).version)
    client.update_model_version(name, version, description=description)
    client.update_registered_model(name, description=model_description(category))
    client.set_registered_model_alias(name, CHALLENGER, version)
    maybe_promote(client, params, name, version, compared)
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
Each version's description compares it with the champion it would replace, both scored on that version's
test split (when the champion cannot be scored there, with the champion's metrics as registered, and says so).
"""


def model_description(category: str) -> str:
    """The registered model's description: what it takes and returns (the serving contract), how to call it."""
    return MODEL_DESCRIPTION.format(category=category, accepted_input=ACCEPTED_INPUT, output=OUTPUT_DESCRIPTION)


def version_description(
    params: Params,
    category: str,
    metrics: dict[str, Any],
    tags: dict[str, str],
    changes: list[str],
    compared: Comparison,
) -> str:
    """Markdown for a new version: its test metrics beside the champion's, what changed, lineage, how to reproduce."""
    lines = [*comparison_lines(category, compared), "", pixel_coverage(metrics), "", *kind_lines(metrics)]
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


def comparison_lines(category: str, compared: Comparison) -> list[str]:
    """The page's title and its table: this version | champion | difference, and on what they stand."""
    champion = compared.champion
    title = f"vs champion (version {champion})" if champion else "(no champion yet: this version becomes it)"
    lines = [f"### {category}: test metrics {title}", "", *([compared.basis, ""] if compared.basis else [])]
    lines += ["| metric | this version | champion | difference |", "|---|---|---|---|"]
    for key in METRIC_NAMES:
        new, old = compared.this_version.get(key), compared.champion_metrics.get(key)
        difference = f"{new - old:+.4f}" if isinstance(new, float) and isinstance(old, float) else ""
        lines.append(f"| {key} | {number(new)} | {number(old)} | {difference} |")
    return lines


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
        predictor = mlflow.pyfunc.load_model(uri).unwrap_python_model().predictor
    except MlflowException as err:
        raise AdpsError(f"cannot load {uri} from {mlflow.get_tracking_uri()}: {err.message}") from err
    except (AdpsError, KeyError, OSError) as err:
        raise AdpsError(f"{uri} loaded but its model files are unusable ({err}); register it again.") from err
    check_registered_category(uri, predictor.thresholds)
    return predictor


def check_registered_category(uri: str, thresholds: dict[str, Any]) -> None:
    """A version of ``adps-<C>`` holds a model of category C (one registered from another category's files
    before registration checked them would otherwise answer for C)."""
    name = uri.removeprefix("models:/").split("@")[0].split("/")[0]
    category = name.removeprefix("adps-") if name.startswith("adps-") else None
    if category is not None and thresholds.get("category") != category:
        raise AdpsError(
            f"{uri} holds a model of category {thresholds.get('category')!r} (its thresholds.json), not {category}: "
            f"it was registered from another category's files. Give {name} another version "
            f"(`adps promote -c {category} --version N`), or register {category}'s own model again."
        )


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
