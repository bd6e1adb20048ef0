"""Whether a model folder's files belong to one model of one category: the one check every stage and loader runs.

``models/<category>/`` holds ``psm.pt`` (it records the category it was trained for), ``thresholds.json``
(the category and the sha256 of the psm.pt they were chosen for), ``reference.json`` (the drift monitor's
reference: both again) and, beside it, ``reports/metrics/<category>.json`` (both again). A file copied in
from another category's folder, or left from another model, would otherwise be registered, exported or
served under this category's name, beside another model's numbers, and no step would say so. Each stage
checks what it reads: ``psm`` the student, ``evaluate`` psm.pt, ``export`` psm.pt and thresholds.json,
``register`` all four, ``predict`` psm.pt and thresholds.json (and their category, when the folder is a
project's ``models/<category>``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adps import paths
from adps.config import Params, ScoreParams, find_params, load_params
from adps.errors import AdpsError
from adps.files import file_sha256
from adps.model.network import KINDS, held_kinds
from adps.training.checkpoints import built_kind, read_checkpoint

THRESHOLD_KEYS = ("image", "pixel", "score", "checkpoint_sha256", "category")
SCORE_EXTRAS = ("kind", "normal_stats")  # what `adps evaluate` adds to the score.* params in thresholds.json
SHA256 = re.compile(r"[0-9a-f]{64}")


def retrain(category: str) -> str:
    """What to run when a category's model files do not belong together."""
    return (
        f"restore models/{category} as DVC recorded it (`dvc checkout models/{category}`), or train {category} "
        f"again: `adps distill -c {category}`, `adps psm -c {category}`, `adps evaluate -c {category}` (or `dvc repro`)"
    )


def check_checkpoint_category(path: Path, checkpoint: dict[str, Any], category: str) -> None:
    """A checkpoint (student.pt, psm.pt) must have been trained for the category whose folder it lies in."""
    found = checkpoint.get("category")
    if found != category:
        said = f"says category {found!r}" if found is not None else "records no category"
        raise AdpsError(f"{path} {said}, but it lies in {category}'s model folder: {retrain(category)}.")


def check_psm_phase(path: Path, checkpoint: dict[str, Any]) -> None:
    """psm.pt is a stage-2 checkpoint (not a student.pt copied in its place)."""
    if checkpoint.get("phase") != "psm":
        raise AdpsError(
            f"{path} is a '{checkpoint.get('phase')}' checkpoint, not a trained PSM: "
            "run `adps psm` and `adps evaluate` for this category."
        )


def read_thresholds_file(path: Path) -> dict[str, Any]:
    """thresholds.json of a model folder: valid JSON, every key prediction needs, values it can use."""
    if not path.is_file():
        raise AdpsError(f"no thresholds.json in {path.parent}: run `adps evaluate` for this category first.")
    try:
        thresholds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdpsError(f"{path} is not valid JSON ({err}): run `adps evaluate` again to rewrite it.") from err
    missing = [k for k in THRESHOLD_KEYS if not isinstance(thresholds, dict) or k not in thresholds]
    if missing:
        raise AdpsError(f"{path} lacks {', '.join(missing)}: run `adps evaluate` again to rewrite it.")
    if problem := threshold_problem(thresholds):
        raise AdpsError(f"{path}: {problem}: run `adps evaluate` again to rewrite it.")
    if problem := score_problem(thresholds["score"]):
        raise AdpsError(f"{path} has a score this psm.pt cannot use ({problem}): run `adps evaluate` again.")
    return thresholds


def threshold_problem(thresholds: dict[str, Any]) -> str:
    """What is wrong with thresholds.json's values ('' when nothing): the image threshold a finite number,
    the pixel threshold one in the anomaly map's range [0, 1], the category a name and the checkpoint hash
    a sha256 (the score settings: :func:`score_problem`)."""
    image, pixel = thresholds["image"], thresholds["pixel"]
    if not is_number(image):
        return f"image is {image!r}, not a finite number"
    if not is_number(pixel) or not 0 <= pixel <= 1:
        return f"pixel is {pixel!r}, not a number in the anomaly map's range [0, 1]"
    category, sha = thresholds["category"], thresholds["checkpoint_sha256"]
    if not isinstance(category, str) or not category:
        return f"category is {category!r}, not a category name"
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        return f"checkpoint_sha256 is {sha!r}, not the sha256 of a psm.pt"
    return ""


def score_problem(score: Any) -> str:
    """What is wrong with thresholds.json's ``score`` ('' when nothing): the ``score.*`` params, plus the kind
    that answers and the normal statistics the combination needs."""
    if not isinstance(score, dict):
        return f"score is {score!r}, not the score settings"
    try:
        ScoreParams.model_validate({k: v for k, v in score.items() if k not in SCORE_EXTRAS})
    except ValidationError as err:
        first = err.errors()[0]
        return f"score.{'.'.join(map(str, first['loc']))} is {first.get('input')!r}: {first['msg']}"
    kind = score.get("kind")
    if kind is not None and kind not in KINDS:
        return f"score.kind is {kind!r}, not one of {', '.join(KINDS)}"
    stats = score.get("normal_stats")
    if stats is not None:
        pairs = stats.items() if isinstance(stats, dict) else [(None, None)]
        for name, pair in pairs:
            fine = isinstance(pair, list) and len(pair) == 2 and all(map(is_number, pair)) and pair[1] > 0
            if name not in KINDS or not fine:
                return f"score.normal_stats has {name!r}: {pair!r}, not a kind with [mean, std > 0]"
    return ""


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_thresholds_belong(folder: Path, checkpoint: dict[str, Any], thresholds: dict[str, Any]) -> None:
    """thresholds.json was chosen for exactly this folder's psm.pt: its hash, its category, a kind it holds."""
    psm, chosen = folder / paths.PSM_FILE, folder / paths.THRESHOLDS_FILE
    if thresholds["checkpoint_sha256"] != file_sha256(psm):
        owner = checkpoint.get("category", "another category")
        raise AdpsError(
            f"{psm} is not the checkpoint {chosen} was chosen for (it was trained for {owner}); restore the "
            f"folder from DVC (`dvc checkout`), or rerun `adps evaluate` for {owner} to choose thresholds for "
            "this psm.pt."
        )
    if thresholds["category"] != checkpoint.get("category"):
        raise AdpsError(
            f"{chosen} says category {thresholds['category']!r} but {psm} says {checkpoint.get('category')!r}: "
            f"rerun `adps evaluate -c {checkpoint.get('category')}`."
        )
    built = built_kind(checkpoint.get("spec", {}).get("model", {}).get("kind", "adps"))
    answer = thresholds["score"].get("kind")
    if answer is not None and answer not in held_kinds(built):
        raise AdpsError(
            f"{chosen} has a score this psm.pt cannot use (score.kind {answer!r}; the model is built as "
            f"{built!r}): run `adps evaluate` again."
        )


def check_folder_category(folder: Path, thresholds: dict[str, Any], category: str | None) -> None:
    """thresholds.json (and so psm.pt, which it is tied to) is ``category``'s, when the category is known."""
    if category is not None and thresholds["category"] != category:
        raise AdpsError(
            f"{folder / paths.THRESHOLDS_FILE} says category {thresholds['category']!r}, but it lies in "
            f"{category}'s model folder: {retrain(category)}."
        )


def project_category(folder: Path) -> str | None:
    """The category whose model folder ``folder`` is (``models/<category>`` of the ADPS project above it), or
    None when it is a folder of its own (a copied model, a registry bundle): then only its files say."""
    folder = Path(folder).resolve()
    if folder.parent.name != paths.MODELS_ROOT.name:
        return None
    params_file = find_params(folder)
    if params_file is None or params_file.parent != folder.parent.parent:
        return None
    try:
        params = load_params(params_file)
    except AdpsError:  # a broken params file is not the model's fault: the files alone are checked
        return None
    return next((c for c in params.data.categories if paths.model_dir(params, c).resolve() == folder), None)


def check_record_belongs(path: Path, record: dict[str, Any], sha_key: str, sha: str, category: str) -> None:
    """A report of the model (metrics, drift reference) names the same category and psm.pt as the folder."""
    run = "`adps evaluate -c " + category + "`"
    if record.get("category") != category:
        raise AdpsError(f"{path} says category {record.get('category')!r}, not {category!r}: run {run}.")
    if record.get(sha_key) != sha:
        found = record.get(sha_key) or "no psm.pt"
        raise AdpsError(
            f"{path} was measured on another model (psm.pt sha256 {str(found)[:12]}, this folder's "
            f"{sha[:12]}): run {run} to measure this one."
        )


def read_report(path: Path, category: str) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdpsError(f"{path} cannot be read ({err}): run `adps evaluate -c {category}`.") from err
    if not isinstance(report, dict):
        raise AdpsError(f"{path} is not a report of `adps evaluate`: run `adps evaluate -c {category}`.")
    return report


def check_model_folder(params: Params, category: str, reports: bool = False) -> dict[str, Any]:
    """The category's model folder holds one model of this category: psm.pt trained for it, thresholds.json
    chosen for that psm.pt (with usable values), and with ``reports`` the metrics and drift reference
    measured on it. Returns thresholds.json. Run before anything is exported or registered."""
    folder = paths.model_dir(params, category)
    checkpoint = read_checkpoint(paths.psm_checkpoint(params, category))
    check_psm_phase(paths.psm_checkpoint(params, category), checkpoint)
    check_checkpoint_category(paths.psm_checkpoint(params, category), checkpoint, category)
    thresholds = read_thresholds_file(paths.thresholds_file(params, category))
    check_thresholds_belong(folder, checkpoint, thresholds)
    if reports:
        sha = thresholds["checkpoint_sha256"]
        metrics = paths.metrics_file(params, category)
        check_record_belongs(metrics, read_report(metrics, category), "checkpoint_sha256", sha, category)
        reference = paths.reference_file(params, category)
        if reference.is_file():
            check_record_belongs(reference, read_report(reference, category), "psm_sha256", sha, category)
    return thresholds
