"""Dataset validation with Great Expectations 1.x over a one-row-per-image metadata table.

The table holds what can be read off each file (does it decode fully, mode, bit depth, size, its
mask's size and values, a content hash); the GX suite states what a usable dataset must satisfy.
Every failing row is reported with its file and the reason, and GX data docs are built as HTML.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adps.config import ValidationParams
from adps.data.images import DecodedImage, decode_image, describe_mask_values, mask_defect, mask_values, rgb_image
from adps.data.layout import Sample
from adps.errors import ImageReadError
from adps.files import file_sha256, path_text

logger = logging.getLogger(__name__)

SUITE_NAME = "adps-dataset"


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    failures: list[dict[str, str]]
    checks: list[dict[str, Any]]
    metadata: pd.DataFrame
    counts: pd.DataFrame


def read_image_facts(path: Path) -> dict[str, Any]:
    """Decode a file completely, as training and prediction do, and return what it is (or why it cannot be read)."""
    facts: dict[str, Any] = {
        "decodes": False,
        "decode_error": "",
        "mode": None,
        "bit_depth": None,
        "width": None,
        "height": None,
    }
    try:
        decoded = decode_image(path)
        rgb_image(decoded, path_text(path))  # the colour conversion every reader applies
    except ImageReadError as err:
        facts["decode_error"] = read_error_detail(err)
        return facts
    width, height = decoded.size
    facts.update(decodes=True, mode=decoded.mode, bit_depth=decoded.bit_depth, width=width, height=height)
    return facts


def read_error_detail(err: ImageReadError) -> str:
    """Why a file cannot be read, without the file name (the report's row names it)."""
    cause = err.__cause__
    if cause is None:
        return path_text(str(err))
    return path_text(str(cause) if isinstance(cause, ValueError) else f"{type(cause).__name__}: {cause}")


def read_mask_facts(
    mask_path: Path | None, image_size: tuple[int, int] | None, is_defect: bool, threshold: float | None = None
) -> dict[str, Any]:
    """Facts of a mask file, read as training reads it; every value is None when there is no mask.

    ``threshold``: the mask rule (``data.mask_threshold``); the dataset's own masks are read with None (prepare
    already wrote them by the rule, so they must be two-level), a reviewer's mask with the project's setting.
    ``mask_values``: what the file holds (format, distinct values) and the setting that reads it, for messages.
    """
    facts: dict[str, Any] = {
        "mask_decodes": None,
        "mask_error": "",
        "mask_size_matches": None,
        "mask_binary": None,
        "mask_nonempty": None,
        "mask_values": "",
    }
    if mask_path is None:
        return facts
    try:
        decoded = decode_image(mask_path, what="mask")
    except ImageReadError as err:
        facts.update(mask_decodes=False, mask_error=read_error_detail(err))
        return facts
    values = np.unique(mask_values(decoded))
    two_level = len(values) <= 2 and (values[0] == 0 or len(values) == 1)
    facts["mask_decodes"] = True
    facts["mask_size_matches"] = None if image_size is None else decoded.size == image_size
    facts["mask_binary"] = threshold is not None or bool(two_level)
    facts["mask_nonempty"] = bool(mask_defect(decoded, threshold).any()) if is_defect else None
    facts["mask_values"] = "" if facts["mask_binary"] else not_two_level_advice(describe_mask_values(decoded), decoded)
    return facts


def not_two_level_advice(description: str, decoded: DecodedImage) -> str:
    """What a mask that is not two-level holds, and the setting that reads it (the JPEG advice only for JPEGs)."""
    scale = " (on 0..255: 16-bit values are scaled by 255 / 65535)" if decoded.bit_depth == 16 else ""
    example = f"data.mask_threshold, e.g. 127, to read defect = value > 127{scale}"
    if decoded.format in ("JPEG", "MPO"):
        return f"{description}: JPEG compression greys a mask's edges; save masks as PNG, or set {example}"
    return f"{description}: set {example}"


def mask_facts(sample: Sample, size: tuple[int, int] | None, recorded: Any) -> dict[str, Any]:
    """:func:`read_mask_facts` of a sample, with ``mask_binary_detail``: the mask file and what it holds."""
    facts = read_mask_facts(sample.mask_path, size, sample.label == 1)
    detail = f"{recorded(sample.mask_path)} is {facts['mask_values']}" if facts["mask_values"] else ""
    return facts | {"mask_binary_detail": detail}


def file_digest(path: Path) -> str:
    return file_sha256(path) if path.is_file() else ""


def build_metadata_table(samples: Iterable[Sample], root: Path | None = None, progress: bool = False) -> pd.DataFrame:
    """One row per image: where it sits, what it is, and what can be read off its files.

    Paths are recorded relative to ``root`` (the project root) when inside it, so the table of the
    same images is the same wherever the project lives.
    """
    from tqdm import tqdm

    def recorded(path: Path) -> str:
        return path_text(path.relative_to(root) if root is not None and path.is_relative_to(root) else path)

    rows = []
    for s in tqdm(list(samples), desc="reading images", unit="img", disable=not progress):
        image = read_image_facts(s.image_path)
        size = (image["width"], image["height"]) if image["decodes"] else None
        rows.append(
            {
                "category": s.category,
                "split": s.split,
                "label": s.label,
                "defect_type": s.defect_type,
                "path": recorded(s.image_path),
                "mask_path": recorded(s.mask_path) if s.mask_path else "",
                **image,
                "is_defect": s.label == 1,
                "has_mask": s.mask_path is not None,
                "mask_on_good_image": s.label == 0 and s.mask_path is not None,
                **mask_facts(s, size, recorded),
                "train_is_normal": s.split != "train" or s.label == 0,
                "sha256": file_digest(s.image_path),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    splits_per_hash = table.groupby(["category", "sha256"])["split"].transform("nunique")
    table["in_train_and_test"] = splits_per_hash > 1
    return table


def build_counts_table(metadata: pd.DataFrame, categories: Iterable[str]) -> pd.DataFrame:
    """One row per category: images in train, normal test images, defect test images."""
    rows = []
    for category in categories:
        rows_c = metadata[metadata["category"] == category] if not metadata.empty else metadata
        test = rows_c[rows_c["split"] == "test"] if not rows_c.empty else rows_c
        rows.append(
            {
                "category": category,
                "path": f"<category {category}>",
                "n_train": int((rows_c["split"] == "train").sum()) if not rows_c.empty else 0,
                "n_test_good": int((test["label"] == 0).sum()) if not test.empty else 0,
                "n_test_defect": int((test["label"] == 1).sum()) if not test.empty else 0,
                "n_test_defect_without_mask": int(((test["label"] == 1) & ~test["has_mask"]).sum())
                if not test.empty
                else 0,
            }
        )
    return pd.DataFrame(rows)


def dataset_expectations(cfg: ValidationParams) -> dict[str, list[Any]]:
    """The suites, per table: what every dataset must satisfy, each with its user-facing reason.

    ``images`` has one row per image, ``counts`` one row per category. The reason shown next to
    each failing file travels in the expectation's ``meta``.
    """
    import great_expectations as gx

    E = gx.expectations

    def expect(cls: Any, reason: str, **kwargs: Any) -> Any:
        return cls(meta={"reason": reason}, **kwargs)

    def in_set(column: str, values: list[Any], reason: str) -> Any:
        return expect(E.ExpectColumnValuesToBeInSet, reason, column=column, value_set=values)

    def at_least(column: str, minimum: int, reason: str) -> Any:
        return expect(E.ExpectColumnValuesToBeBetween, reason, column=column, min_value=minimum)

    side = f"outside [{cfg.min_side}, {cfg.max_side}] pixels"
    return {
        "images": [
            in_set("decodes", [True], "image cannot be read"),
            *policy_expectations(cfg, in_set),
            expect(
                E.ExpectColumnValuesToBeBetween,
                f"width {side}",
                column="width",
                min_value=cfg.min_side,
                max_value=cfg.max_side,
            ),
            expect(
                E.ExpectColumnValuesToBeBetween,
                f"height {side}",
                column="height",
                min_value=cfg.min_side,
                max_value=cfg.max_side,
            ),
            in_set("mask_on_good_image", [False], "a mask exists for a good image (normal images need none)"),
            in_set("mask_decodes", [True], "mask cannot be read"),
            in_set("mask_size_matches", [True], "mask size differs from image size"),
            in_set("mask_binary", [True], "mask values are not binary (expected 0 and one foreground value)"),
            in_set(
                "mask_nonempty",
                [True],
                "defect mask is empty (mark the defect, or set data.empty_defect_mask: image_label and rerun prepare "
                "to keep it labelled by image only)",
            ),
            in_set(
                "train_is_normal",
                [True],
                "anomalous image in the training split (train/ must hold only good images)",
            ),
            in_set(
                "in_train_and_test",
                [False],
                "identical image in both train and test (a test image copied into train?)",
            ),
        ],
        "files": [in_set("used", [True], "file not used, or not usable as it lies")],
        "counts": [
            at_least("n_train", cfg.min_train, f"fewer than {cfg.min_train} training images"),
            at_least("n_test_good", cfg.min_test_good, f"fewer than {cfg.min_test_good} normal test images"),
            at_least("n_test_defect", cfg.min_test_defect, f"fewer than {cfg.min_test_defect} defect test images"),
        ],
    }


def policy_expectations(cfg: ValidationParams, in_set: Any) -> list[Any]:
    """The site's own limits on modes and bit depths (none when ``allowed_*`` is null: whatever reads)."""
    rules = []
    if cfg.allowed_modes is not None:
        allowed = ", ".join(cfg.allowed_modes)
        rules.append(in_set("mode", list(cfg.allowed_modes), f"image mode not allowed (allowed: {allowed})"))
    if cfg.allowed_bit_depths is not None:
        allowed = str(list(cfg.allowed_bit_depths))
        rules.append(in_set("bit_depth", list(cfg.allowed_bit_depths), f"bit depth not allowed (allowed: {allowed})"))
    return rules


def run_expectations(tables: dict[str, pd.DataFrame], cfg: ValidationParams, docs_dir: Path) -> list[Any]:
    """Validate each table with its suite through one GX checkpoint; build data docs in ``docs_dir``.

    Returns the GX expectation results of all suites.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in ctx.get_site_names():  # the ephemeral default site would write a docs copy into /tmp every run
        ctx.delete_data_docs_site(site)
    ctx.add_data_docs_site(
        site_name="adps",
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
        },
    )
    source = ctx.data_sources.add_pandas("adps-metadata")
    definitions = []
    for name, expectations in dataset_expectations(cfg).items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{SUITE_NAME}-{name}", expectations=expectations))
        definitions.append(ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name)))
    results = []
    for definition in definitions:
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"{SUITE_NAME}-{definition.name}",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs")],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": tables[definition.name]})
        for run in outcome.run_results.values():
            results.extend(run.results)
    return results


DETAIL_COLUMNS = {  # check -> the column of its table that says which file or why
    "decodes": "decode_error",
    "mask_decodes": "mask_error",
    "mask_size_matches": "mask_path",
    "mask_binary": "mask_binary_detail",
    "mask_nonempty": "mask_path",
    "used": "why",
}


def failure_details(tables: list[pd.DataFrame]) -> dict[str, dict[str, str]]:
    """For each check with details, the detail of every row, by path."""
    details: dict[str, dict[str, str]] = {}
    for check, column in DETAIL_COLUMNS.items():
        for table in tables:
            if not table.empty and column in table:
                details.setdefault(check, {}).update(zip(table["path"], table[column].fillna(""), strict=True))
    return details


def failures_from_results(results: list[Any], tables: list[pd.DataFrame]) -> list[dict[str, str]]:
    """One row per (file, failed check): the file, the check and the reason (with its detail)."""
    details = failure_details(tables)
    failures = []
    for result in results:
        if result.success:
            continue
        config = result.expectation_config
        reason = config.meta.get("reason", config.type)
        check = config.kwargs.get("column") or f"{config.kwargs['column_A']} == {config.kwargs['column_B']}"
        for row in result.result.get("unexpected_index_list") or []:
            detail = details.get(config.kwargs.get("column"), {}).get(row["path"], "")
            failures.append(
                {
                    "file": row["path"],
                    "check": check,
                    "reason": f"{reason}: {detail}" if detail else reason,
                }
            )
    return sorted(failures, key=lambda f: (f["file"], f["check"]))


def summarise_results(results: list[Any]) -> list[dict[str, Any]]:
    """Per-check outcome for the JSON summary."""
    return [
        {
            "check": r.expectation_config.type,
            "column": r.expectation_config.kwargs.get("column") or r.expectation_config.kwargs.get("column_A"),
            "reason": r.expectation_config.meta.get("reason", ""),
            "success": bool(r.success),
            "unexpected_count": int(r.result.get("unexpected_count") or 0),
        }
        for r in results
    ]


def validate_dataset(
    samples: list[Sample],
    categories: Iterable[str],
    cfg: ValidationParams,
    docs_dir: Path,
    root: Path | None = None,
    progress: bool = False,
    unused: list[dict[str, str]] | None = None,
) -> ValidationReport:
    """Build the metadata tables, run the GX suites and collect every failing file with its reason.

    ``unused``: files of the dataset (or its source) that no sample uses, as ``{"path", "why"}``;
    each is a failure. Files are named relative to ``root`` (the project root) in the tables and failures.
    """
    metadata = build_metadata_table(samples, root, progress=progress)
    counts = build_counts_table(metadata, categories)
    if metadata.empty:
        metadata = pd.DataFrame([{"path": "<no images>", "decodes": False, "decode_error": "dataset is empty"}])
    files = pd.DataFrame([{**row, "used": False} for row in unused or []], columns=["path", "why", "used"])
    results = run_expectations({"images": metadata, "files": files, "counts": counts}, cfg, docs_dir)
    failures = failures_from_results(results, [metadata, files])
    return ValidationReport(
        success=not failures,
        failures=failures,
        checks=summarise_results(results),
        metadata=metadata,
        counts=counts,
    )
