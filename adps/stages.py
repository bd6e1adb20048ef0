"""One function per pipeline stage: ``(params[, category]) -> files on disk + a small result``.

Both front-ends call these and nothing else: the ``adps`` CLI (and so ``dvc.yaml``) and the
Prefect flows. Inputs and outputs are the canonical paths of :mod:`adps.paths`; outputs are
written atomically, so a failing stage leaves earlier outputs intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adps import paths
from adps.config import Params
from adps.data import layout, synthetic
from adps.data.validation import validate_dataset
from adps.errors import ValidationFailed
from adps.files import replace_dir_atomically, write_json_atomically, write_text_atomically
from adps.runtime import progress_enabled

logger = logging.getLogger(__name__)


def build_dataset(params: Params, dest: Path) -> dict[str, int]:
    """Generate or import every category of ``data.categories`` into ``dest`` (MVTec layout)."""
    data = params.data
    counts = {}
    for category in data.categories:
        target = dest / category
        if data.source == "synthetic":
            synthetic.generate_category(
                category, params.synthetic, params.runtime.seed, target, progress=progress_enabled(params)
            )
        elif data.source == "mvtec":
            layout.import_mvtec_category(Path(data.import_path), category, target)
        elif data.source == "kolektor":
            layout.import_kolektor(Path(data.import_path), target)
        else:
            root = Path(data.import_path) / category
            layout.import_folder_category(
                root / data.folder.normal,
                root / data.folder.anomalous,
                root / data.folder.masks,
                target,
                mask_suffix=data.folder.mask_suffix,
                test_normal_fraction=data.folder.test_normal_fraction,
                seed=params.runtime.seed,
            )
        counts[category] = len(layout.build_sample_index(target, category))
        logger.info("prepared %s: %d images", category, counts[category])
    return counts


def prepare(params: Params) -> dict[str, Any]:
    """Stage ``prepare``: build or import the dataset into ``data/<source>/``.

    The new dataset is built in a temp folder and swapped in only when complete.
    """
    counts: dict[str, int] = {}
    target = paths.dataset_dir(params)
    replace_dir_atomically(target, lambda tmp: counts.update(build_dataset(params, tmp)))
    return {"dataset": str(target), "images": counts}


def load_samples(params: Params) -> list[layout.Sample]:
    """Index every image of every configured category."""
    return [
        sample
        for category in params.data.categories
        for sample in layout.build_sample_index(paths.category_dir(params, category), category)
    ]


def validate(params: Params) -> dict[str, Any]:
    """Stage ``validate``: Great Expectations checks of the dataset.

    Writes ``reports/validation/`` (summary.json, metadata.csv, failures.csv, data_docs/) and
    raises :class:`ValidationFailed` naming every bad file when a check fails.
    """
    holder: dict[str, Any] = {}

    def run(docs_tmp: Path) -> None:
        holder["report"] = validate_dataset(
            load_samples(params),
            params.data.categories,
            params.validation,
            docs_tmp,
            progress=progress_enabled(params),
        )

    replace_dir_atomically(paths.data_docs_dir(), run)
    report = holder["report"]
    summary = {
        "success": report.success,
        "n_images": len(report.metadata),
        "n_failures": len(report.failures),
        "counts": report.counts.drop(columns="path").to_dict(orient="records"),
        "checks": report.checks,
        "failures": report.failures,
        "data_docs": str(paths.data_docs_dir() / "index.html"),
    }
    write_text_atomically(paths.validation_metadata_csv(), report.metadata.to_csv(index=False))
    write_text_atomically(paths.validation_failures_csv(), failures_csv(report.failures))
    write_json_atomically(paths.validation_summary(), summary)
    if not report.success:
        files = sorted({f["file"] for f in report.failures})
        raise ValidationFailed(
            f"dataset validation failed: {len(report.failures)} problem(s) in {len(files)} file(s); "
            f"see {paths.validation_failures_csv()} and {summary['data_docs']}",
            report.failures,
        )
    return {"success": True, "n_images": summary["n_images"], "summary": str(paths.validation_summary())}


def failures_csv(failures: list[dict[str, str]]) -> str:
    import pandas as pd

    return pd.DataFrame(failures, columns=["file", "check", "reason"]).to_csv(index=False)
