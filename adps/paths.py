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


def dataset_dir(params: Params) -> Path:
    """``data/<source>``: the dataset in MVTec layout, one folder per category."""
    return DATA_ROOT / params.data.source


def category_dir(params: Params, category: str) -> Path:
    return dataset_dir(params) / category


def validation_dir() -> Path:
    return REPORTS_ROOT / "validation"


def validation_summary() -> Path:
    return validation_dir() / "summary.json"


def validation_failures_csv() -> Path:
    return validation_dir() / "failures.csv"


def validation_metadata_csv() -> Path:
    return validation_dir() / "metadata.csv"


def data_docs_dir() -> Path:
    return validation_dir() / "data_docs"
