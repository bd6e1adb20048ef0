"""Every canonical file path of the pipeline, derived from params: the one place they live.

Every path is resolved against the project root, ``params.root`` (the params file's folder), never
against the working directory: DVC stages, Prefect tasks on Dask workers and tuning trials in their
own folders write exactly the files their params point at, wherever the process runs. What is
recorded in files (validation tables, fingerprints) is relative to the root (:func:`in_project`),
so a project gives the same bytes wherever it is cloned.
"""

from __future__ import annotations

import re
from pathlib import Path

from adps.config import Params

DATA_ROOT = Path("data")
MODELS_ROOT = Path("models")
REPORTS_ROOT = Path("reports")
LOCKS_ROOT = Path(".adps") / "locks"  # git-ignored
# A model folder's files: psm.pt + thresholds.json are the deployable model, model.onnx its export.
STUDENT_FILE, PSM_FILE, THRESHOLDS_FILE, ONNX_FILE = "student.pt", "psm.pt", "thresholds.json", "model.onnx"
REFERENCE_FILE = "reference.json"  # what the drift monitor compares production with (adps evaluate)


def in_project(params: Params, path: Path) -> str:
    """``path`` as recorded in files and messages: relative to the project root when inside it."""
    path = Path(path)
    return str(path.relative_to(params.root)) if path.is_relative_to(params.root) else str(path)


def import_dir(params: Params) -> Path:
    """``data.import_path`` (where new images arrive), resolved against the project root."""
    return params.root / params.data.import_path


def dataset_dir(params: Params) -> Path:
    """``data/<source>``: the dataset in MVTec layout, one folder per category."""
    return params.root / DATA_ROOT / params.data.source


def category_dir(params: Params, category: str) -> Path:
    return dataset_dir(params) / category


def validation_dir(params: Params, category: str) -> Path:
    """``reports/validation/<category>``: the category's validation result (gates its training)."""
    return params.root / REPORTS_ROOT / "validation" / category


def validation_summary(params: Params, category: str) -> Path:
    return validation_dir(params, category) / "summary.json"


def validation_failures_csv(params: Params, category: str) -> Path:
    return validation_dir(params, category) / "failures.csv"


def validation_metadata_csv(params: Params, category: str) -> Path:
    return validation_dir(params, category) / "metadata.csv"


def data_docs_dir(params: Params, category: str) -> Path:
    return validation_dir(params, category) / "data_docs"


def model_dir(params: Params, category: str) -> Path:
    """``models/<category>``: student.pt, psm.pt and thresholds.json (the deployable model)."""
    return params.root / MODELS_ROOT / category


def student_checkpoint(params: Params, category: str) -> Path:
    return model_dir(params, category) / STUDENT_FILE


def psm_checkpoint(params: Params, category: str) -> Path:
    return model_dir(params, category) / PSM_FILE


def thresholds_file(params: Params, category: str) -> Path:
    return model_dir(params, category) / THRESHOLDS_FILE


def reference_file(params: Params, category: str) -> Path:
    """``models/<category>/reference.json``: the model on held-out normal images, for the drift monitor."""
    return model_dir(params, category) / REFERENCE_FILE


def onnx_file(params: Params, category: str) -> Path:
    """``models/<category>/model.onnx``: the whole inference path for ONNX Runtime (``adps export``)."""
    return model_dir(params, category) / ONNX_FILE


def resume_checkpoint(final: Path) -> Path:
    """In-progress training state next to a final checkpoint (survives interruption, not a DVC output)."""
    return final.with_name(f".{final.stem}.resume.pt")


def train_history(params: Params, category: str, phase: str) -> Path:
    """``reports/train/<category>/<phase>.json``: per-epoch losses, lr and seconds (DVC plots)."""
    return params.root / REPORTS_ROOT / "train" / category / f"{phase}.json"


def metrics_file(params: Params, category: str) -> Path:
    return params.root / REPORTS_ROOT / "metrics" / f"{category}.json"


def plots_dir(params: Params, category: str) -> Path:
    return params.root / REPORTS_ROOT / "plots" / category


PLOT_FILES = ("image_roc.json", "pixel_roc.json", "image_pr.json", "pixel_pr.json", "curves.png", "heatmaps.png")


def plot_files(params: Params, category: str) -> list[Path]:
    """``reports/plots/<category>/``: ROC and PR curves (``dvc plots``), their figure and the heatmap grid."""
    return [plots_dir(params, category) / name for name in PLOT_FILES]


def heatmaps_dir(params: Params, category: str) -> Path:
    return params.root / REPORTS_ROOT / "heatmaps" / category


def registry_record(params: Params, category: str) -> Path:
    """``reports/registry/<category>.json``: registered model name, version, run and aliases."""
    return params.root / REPORTS_ROOT / "registry" / f"{category}.json"


def category_lock(params: Params, category: str) -> Path:
    """Held while a stage writes one category's files (any front-end, any process)."""
    return params.root / LOCKS_ROOT / f"{category}.lock"


def pipeline_lock(params: Params) -> Path:
    """Held for a whole run of the Prefect flow ``adps-pipeline`` (one at a time per project)."""
    return params.root / LOCKS_ROOT / "pipeline.lock"


def cluster_probe(params: Params) -> Path:
    """A token each Dask worker must read back: proof that it sees this project (flows/cluster.py)."""
    return params.root / ".adps" / "cluster-probe"


def dvc_calls_lock(params: Params) -> Path:
    """Held while the flow runs a ``dvc`` command (one at a time per project, from any process)."""
    return params.root / LOCKS_ROOT / "dvc.lock"


def dataset_lock(params: Params) -> Path:
    """Held while ``prepare`` writes the dataset."""
    return params.root / LOCKS_ROOT / "prepare.lock"


def pipeline_outputs() -> tuple[Path, ...]:
    """What the pipeline itself writes in the repository (with the ``.gitignore`` files DVC adds there).

    Changes under these do not make a run "dirty": only source and params count.
    """
    return (DATA_ROOT, MODELS_ROOT, REPORTS_ROOT, Path("dvc.lock"))


def absolute_sqlite_url(url: str, root: Path) -> str:
    """A ``sqlite:///relative.db`` URL resolved against the project ``root``, other URLs unchanged.

    DVC's queued experiments run in a temp copy and tuning workers in their own folders: a relative
    sqlite path there would silently start a new, empty database.
    """
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        return prefix + str((root / url[len(prefix) :]).resolve())
    return url


def sqlalchemy_url(url: str, root: Path) -> str:
    """A database URL as SQLAlchemy takes it: relative sqlite paths made absolute (:func:`absolute_sqlite_url`),
    and ``postgresql://`` given the installed psycopg 3 driver (SQLAlchemy's default is psycopg2)."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", absolute_sqlite_url(url, root))


def tuning_dir(params: Params, category: str) -> Path:
    """``reports/tuning/<category>``: best_params.yaml and trials.csv of the category's study."""
    return params.root / REPORTS_ROOT / "tuning" / category


def best_params_file(params: Params, category: str) -> Path:
    return tuning_dir(params, category) / "best_params.yaml"
