"""Every canonical file path of the pipeline, derived from params: the one place they live.

All paths are relative to the project root (the working directory of ``adps`` and ``dvc``), so
DVC stages and Prefect tasks write exactly the same files.
"""

from __future__ import annotations

from pathlib import Path

from adps.config import Params

DATA_ROOT = Path("data")
MODELS_ROOT = Path("models")
REPORTS_ROOT = Path("reports")
LOCKS_ROOT = Path(".adps") / "locks"  # git-ignored


def dataset_dir(params: Params) -> Path:
    """``data/<source>``: the dataset in MVTec layout, one folder per category."""
    return DATA_ROOT / params.data.source


def category_dir(params: Params, category: str) -> Path:
    return dataset_dir(params) / category


def validation_dir(category: str) -> Path:
    """``reports/validation/<category>``: the category's validation result (gates its training)."""
    return REPORTS_ROOT / "validation" / category


def validation_summary(category: str) -> Path:
    return validation_dir(category) / "summary.json"


def validation_failures_csv(category: str) -> Path:
    return validation_dir(category) / "failures.csv"


def validation_metadata_csv(category: str) -> Path:
    return validation_dir(category) / "metadata.csv"


def data_docs_dir(category: str) -> Path:
    return validation_dir(category) / "data_docs"


def model_dir(category: str) -> Path:
    """``models/<category>``: student.pt, psm.pt and thresholds.json (the deployable model)."""
    return MODELS_ROOT / category


def student_checkpoint(category: str) -> Path:
    return model_dir(category) / "student.pt"


def psm_checkpoint(category: str) -> Path:
    return model_dir(category) / "psm.pt"


def thresholds_file(category: str) -> Path:
    return model_dir(category) / "thresholds.json"


def onnx_file(category: str) -> Path:
    """``models/<category>/model.onnx``: the whole inference path for ONNX Runtime (``adps export``)."""
    return model_dir(category) / "model.onnx"


def resume_checkpoint(final: Path) -> Path:
    """In-progress training state next to a final checkpoint (survives interruption, not a DVC output)."""
    return final.with_name(f".{final.stem}.resume.pt")


def train_history(category: str, phase: str) -> Path:
    """``reports/train/<category>/<phase>.json``: per-epoch losses, lr and seconds (DVC plots)."""
    return REPORTS_ROOT / "train" / category / f"{phase}.json"


def metrics_file(category: str) -> Path:
    return REPORTS_ROOT / "metrics" / f"{category}.json"


def plots_dir(category: str) -> Path:
    return REPORTS_ROOT / "plots" / category


def heatmaps_dir(category: str) -> Path:
    return REPORTS_ROOT / "heatmaps" / category


def registry_record(category: str) -> Path:
    """``reports/registry/<category>.json``: registered model name, version, run and aliases."""
    return REPORTS_ROOT / "registry" / f"{category}.json"


def category_lock(category: str) -> Path:
    """Held while a stage writes one category's files (any front-end, any process)."""
    return LOCKS_ROOT / f"{category}.lock"


def pipeline_lock() -> Path:
    """Held for a whole run of the Prefect flow ``adps-pipeline`` (one at a time per project)."""
    return LOCKS_ROOT / "pipeline.lock"


def dataset_lock() -> Path:
    """Held while ``prepare`` writes the dataset."""
    return LOCKS_ROOT / "prepare.lock"


def dvc_lock() -> Path:
    return Path("dvc.lock")


def pipeline_outputs() -> tuple[Path, ...]:
    """What the pipeline itself writes in the repository (with the ``.gitignore`` files DVC adds there).

    Changes under these do not make a run "dirty": only source and params count.
    """
    return (DATA_ROOT, MODELS_ROOT, REPORTS_ROOT, dvc_lock())


def absolute_sqlite_url(url: str) -> str:
    """A ``sqlite:///relative.db`` URL made absolute, other URLs unchanged.

    DVC's queued experiments run in a temp copy and tuning workers in their own folders: a relative
    sqlite path there would silently start a new, empty database.
    """
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def params_file() -> Path:
    return Path("params.yaml")


def tuning_dir(category: str) -> Path:
    """``reports/tuning/<category>``: best_params.yaml and trials.csv of the category's study."""
    return REPORTS_ROOT / "tuning" / category


def best_params_file(category: str) -> Path:
    return tuning_dir(category) / "best_params.yaml"
