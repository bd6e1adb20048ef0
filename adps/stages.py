"""One function per pipeline stage: ``(params[, category]) -> files on disk + a small result``.

Both front-ends call these and nothing else: the ``adps`` CLI (and so ``dvc.yaml``) and the
Prefect flows. Inputs and outputs are the canonical paths of :mod:`adps.paths`; outputs are
written atomically, so a failing stage leaves earlier outputs intact.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adps import paths
from adps.config import METRIC_NAMES, Params, dotted_value
from adps.data import embedded, layout
from adps.data.datasets import LabelledDataset, TrainDataset, same_size_batches
from adps.data.splits import category_splits, check_category
from adps.data.validation import validate_dataset
from adps.errors import AdpsError, ValidationFailed
from adps.evaluation import reports
from adps.evaluation.kinds import choose_kind, kind_table, score_each_kind
from adps.evaluation.predictions import predict_dataset, validation_predictions
from adps.files import (
    exclusive_lock,
    file_sha256,
    json_text,
    path_text,
    refresh_dir,
    replace_dir_atomically,
    write_json_atomically,
    write_text_atomically,
    write_together,
)
from adps.model.backbones import calibrate_batchnorm
from adps.model.memory_bank import build_bank
from adps.model.network import ADPS, MEMORY_BANK
from adps.model.weights import load_teacher_weights
from adps.runtime import pin_cpu_kernels, progress_enabled, seeded, setup_torch
from adps.training.checkpoints import (
    CheckpointError,
    build_model,
    fingerprint,
    input_normalizer,
    load_model,
    model_spec,
    params_geometry,
    read_checkpoint,
    save_checkpoint,
)
from adps.training.loop import EpochHook, Phase, fit
from adps.training.model_folder import check_checkpoint_category, check_model_folder
from adps.training.phases import distill_step, psm_param_groups, psm_step

logger = logging.getLogger(__name__)


def writes_category(stage: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run a per-category stage under the category's lock.

    Two pipeline runs at once (DVC or Prefect, in any mix, e.g. a slow nightly run and a manual
    one) never write one category's files together: the second fails at once, naming the holder,
    and the first run's outputs stay consistent.
    """

    @functools.wraps(stage)
    def locked(params: Params, category: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with category_lock(params, category):
            return stage(params, category, *args, **kwargs)

    return locked


TORCH_STAGES = threading.Lock()


def alone_in_process(stage: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run a torch-heavy stage (training, evaluation, ONNX export) while no other one runs in this process.

    Two categories trained at once in threads of one process (the flow's thread runner) do not give
    the bits of one at a time (seen: a forced rerun changed psm.pt, so the registry grew); processes
    (``dvc repro``, Dask workers) are unaffected. Threads still overlap validation, DVC checks and
    registration; categories train in parallel on Dask worker processes (``runtime.task_runner``).
    ``torch.onnx.export`` needs it anyway: it keeps global state. The CPU kernels are pinned first
    (``runtime.cpu_kernels``), before the stage computes anything with torch.
    """

    @functools.wraps(stage)
    def alone(params: Params, *args: Any, **kwargs: Any) -> dict[str, Any]:
        pin_cpu_kernels(params.runtime.cpu_kernels)
        with TORCH_STAGES:
            return stage(params, *args, **kwargs)

    return alone


def category_lock(params: Params, category: str):
    """The lock held while anything writes one category's files (stages, and ``prepare`` swapping its data)."""
    busy = f"category {category} is being written by another pipeline run; rerun when it has finished"
    return exclusive_lock(paths.category_lock(params, category), busy)


def train_dataset(params: Params, samples: list[layout.Sample], seed: int) -> TrainDataset:
    """Normal training images with synthetic anomalies, at the model's size and normalisation."""
    geometry = params_geometry(params)
    return TrainDataset(samples, geometry, input_normalizer(params), params.anomalies, seed)


def build_category(params: Params, category: str, dest: Path) -> None:
    """Generate or import one category of ``data.categories`` into ``dest`` (MVTec layout).

    Source files the import leaves out are listed, with why, in ``dest/not_imported.csv`` (validation
    names them; the blocking ones fail it).
    """
    data = params.data
    source = paths.import_dir(params)
    skipped: list[layout.Skipped] = []
    masks = layout.MaskImport(data.mask_threshold, data.empty_defect_mask)
    if data.source == "synthetic":
        embedded.generate_category(
            category, params.synthetic, params.runtime.seed, dest, progress=progress_enabled(params)
        )
    elif data.source == "mvtec":
        skipped += layout.import_mvtec_category(source, category, dest, masks)
    elif data.source == "kolektor":
        skipped += layout.import_kolektor(source, dest, masks=masks)
    if data.source in ("synthetic", "folder"):  # synthetic: images in import_path are added to the generated ones
        root, folder = source / category, data.folder
        skipped += layout.import_folder_category(
            layout.FolderSet(root / folder.normal, root / folder.anomalous, root / folder.masks, folder.mask_suffix),
            dest,
            test_normal_fraction=folder.test_normal_fraction,
            seed=params.runtime.seed,
            require_normals=data.source == "folder",
            masks=masks,
        )
    for entry in skipped:
        logger.warning("%s: %s: not imported (%s)", category, path_text(entry.source), path_text(entry.reason))
    layout.write_not_imported(dest, skipped, lambda path: paths.in_project(params, path))
    layout.write_mask_manifest(dest, masks, lambda path: paths.in_project(params, path))


def prepare(params: Params) -> dict[str, Any]:
    """Stage ``prepare``: build or import the dataset into ``data/<source>/``, one category at a time.

    Each category is rebuilt in a temp folder and swapped in only when its files differ, so a
    category whose source did not change keeps its exact files and DVC sees only the changed ones as
    stale. Folders of categories no longer configured are removed.
    """
    with exclusive_lock(paths.dataset_lock(params), "the dataset is being prepared by another pipeline run"):
        return refresh_dataset(params)


def refresh_dataset(params: Params) -> dict[str, Any]:
    """Rebuild every category's folder, swapping in the changed ones (under each category's lock)."""
    target = paths.dataset_dir(params)
    existed = target.exists()
    changed, counts, not_imported = [], {}, {}
    for category in params.data.categories:
        folder = target / category
        try:
            with category_lock(params, category):
                if refresh_dir(folder, lambda tmp, c=category: build_category(params, c, tmp)):
                    changed.append(category)
        except BaseException:
            if not existed:  # leave no half-made dataset folder behind a failed first import
                shutil.rmtree(target, ignore_errors=True)
            raise
        counts[category] = len(layout.build_sample_index(folder, category))
        state = "changed" if category in changed else "unchanged"
        logger.info("prepared %s: %d images (%s)", category, counts[category], state)
        if left_out := layout.read_not_imported(folder):
            not_imported[category] = left_out
    for stale in sorted(p for p in target.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if stale.name not in params.data.categories:
            shutil.rmtree(stale)
    return {"dataset": str(target), "images": counts, "changed": changed, "not_imported": not_imported}


@writes_category
def validate(params: Params, category: str) -> dict[str, Any]:
    """Stage ``validate@C``: Great Expectations checks of one category's images.

    Writes ``reports/validation/C/`` (summary.json, metadata.csv, failures.csv, data_docs/) and
    raises :class:`ValidationFailed` naming every bad file when a check fails: that category is held
    back, the others go on. The summary has no timestamps, so unchanged images give the same bytes
    and the category's training stays up to date in DVC.
    """
    check_category(params, category)
    holder: dict[str, Any] = {}

    folder = paths.category_dir(params, category)
    left_out = layout.read_not_imported(folder) if folder.is_dir() else []

    def run(docs_tmp: Path) -> None:
        samples = layout.build_sample_index(folder, category)
        holder["report"] = validate_dataset(
            samples,
            [category],
            params.validation,
            docs_tmp,
            params.root,
            progress_enabled(params),
            unused_files(params, folder, samples, left_out),
        )

    replace_dir_atomically(paths.data_docs_dir(params, category), run)
    report = holder["report"]
    summary = {
        "category": category,
        "success": report.success,
        "n_images": len(report.metadata),
        "n_failures": len(report.failures),
        "counts": report.counts.drop(columns="path").to_dict(orient="records"),
        "checks": report.checks,
        "failures": report.failures,
        "not_imported": left_out,
        "data_docs": paths.in_project(params, paths.data_docs_dir(params, category) / "index.html"),
    }
    write_text_atomically(paths.validation_metadata_csv(params, category), report.metadata.to_csv(index=False))
    write_text_atomically(paths.validation_failures_csv(params, category), failures_csv(report.failures))
    summary_path = paths.validation_summary(params, category)
    write_json_atomically(summary_path, summary)
    if not report.success:
        message = validation_message(params, category, report.failures, summary["data_docs"])
        raise ValidationFailed(message, report.failures)
    result = {"success": True, "n_images": summary["n_images"], "summary": str(summary_path)}
    if unmasked := summary["counts"][0]["n_test_defect_without_mask"]:
        result["defects_without_mask"] = (
            f"{unmasked} of {summary['counts'][0]['n_test_defect']} defect images have no mask: "
            "image metrics use all of them, pixel metrics only the ones with a mask"
        )
    return result | ({"not_imported": [f"{r['file']}: {r['reason']}" for r in left_out]} if left_out else {})


def unused_files(
    params: Params, folder: Path, samples: list[layout.Sample], left_out: list[dict[str, str]]
) -> list[dict[str, str]]:
    """Files validation fails on as unused: in the dataset folder, or left out of it by a blocking import rule."""
    unused = [
        {"path": path_text(paths.in_project(params, p)), "why": path_text(why)}
        for p, why in layout.unused_files(folder, samples)
    ]
    reasons: dict[str, list[str]] = {}  # one row per file: a COCO file may be left out for several entries
    for row in left_out:
        if row["blocking"] == "true":
            reasons.setdefault(row["file"], []).append(row["reason"])
    return unused + [{"path": file, "why": f"not imported: {'; '.join(why)}"} for file, why in reasons.items()]


def validation_message(
    params: Params, category: str, failures: list[dict[str, str]], data_docs: str, shown: int = 5
) -> str:
    """What a held-back category's error says: the bad files with their reasons, and where the rest is."""
    files = sorted({f["file"] for f in failures})
    lines = [f"- {f['file']}: {f['reason']}" for f in failures[:shown]]
    more = [f"- ... and {len(failures) - shown} more"] if len(failures) > shown else []
    return "\n".join(
        [
            f"dataset validation failed for {category}: {len(failures)} problem(s) in {len(files)} file(s); "
            f"fix or remove them where they came from (data.import_path: {params.data.import_path}) and rerun:",
            *lines,
            *more,
            f"see {paths.in_project(params, paths.validation_failures_csv(params, category))} and {data_docs}",
        ]
    )


def failures_csv(failures: list[dict[str, str]]) -> str:
    import pandas as pd

    return pd.DataFrame(failures, columns=["file", "check", "reason"]).to_csv(index=False)


def phase_fingerprint(params: Params, category: str, phase: str, train_samples: list, teacher_weights: str = "") -> str:
    """Hash of what a phase's result depends on: the params its stage reads (its row of
    :data:`PIPELINE`, the list dvc.yaml follows), the category, and the contents of what it reads
    from disk: the training images, the texture images and the teacher weights (their record names
    the file's sha256)."""
    payload = {key: dotted_value(params, key) for key in pipeline_stage(phase).params}
    payload.update(
        category=category,
        files={path_text(paths.in_project(params, s.image_path)): file_sha256(s.image_path) for s in train_samples},
        textures=texture_digests(params),
        teacher_weights=teacher_weights,
    )
    return fingerprint(payload)


def texture_digests(params: Params) -> dict[str, str]:
    """sha256 of each image of ``anomalies.texture_dir`` (empty with the built-in procedural textures)."""
    folder = params.anomalies.texture_dir
    return {} if folder is None else {p.name: file_sha256(p) for p in layout.list_images(Path(folder))}


def finish_phase(
    params: Params, final: Path, model, spec: dict, history: list, category: str, phase: str, **meta: Any
) -> None:
    """Write the final checkpoint and history, then drop the resume file.

    The checkpoint's history leaves out wall-clock seconds, so the same params and data give a
    byte-identical checkpoint (and DVC hash) from either front-end; the report keeps them.
    """
    # Through JSON: a resumed history (read back from disk) and an uninterrupted one (sharing float
    # objects, which pickle writes as back-references) then serialise to the same bytes.
    losses = json.loads(json.dumps([{k: v for k, v in entry.items() if k != "seconds"} for entry in history]))
    save_checkpoint(final, model.cpu(), spec, phase=phase, category=category, history=losses, **meta)
    write_json_atomically(paths.train_history(params, category, phase), history)
    paths.resume_checkpoint(final).unlink(missing_ok=True)


@writes_category
@alone_in_process
def distill(params: Params, category: str) -> dict[str, Any]:
    """Stage ``distill@C``: asymmetric distillation of the student, and the memory bank of normal
    teacher features (for the kinds that have them); writes models/C/student.pt."""
    device = setup_torch(params)
    train, val, _ = category_splits(params, category)
    spec = model_spec(params)
    with seeded(params.runtime.seed):
        model = build_model(spec)
    teacher_weights = load_teacher_weights(model.teacher.net, params.model.backbone, params.model.teacher_weights)
    if teacher_weights.startswith("none") and params.model.teacher_bn_calibration:
        teacher_weights += "; BatchNorm statistics from the normal training images"
        calibrate_batchnorm(model.teacher.net, normal_batches(train, params))
    model.to(device)
    final = paths.student_checkpoint(params, category)
    stamp = phase_fingerprint(params, category, "distill", train, teacher_weights)
    history = train_student(params, model, train, stamp, final, device) if model.kind != MEMORY_BANK else []
    bank = fill_memory_bank(params, model, train, val, device) if model.kind != ADPS else None
    finish_phase(
        params, final, model, spec, history, category, "distill", teacher_weights=teacher_weights, fingerprint=stamp
    )
    result = {"checkpoint": str(final), "epochs": len(history), "teacher_weights": teacher_weights}
    result |= {"final_loss": history[-1]["loss_distill"]} if history else {}
    return result | ({"memory_bank": bank} if bank else {})


def train_student(params: Params, model, train: list, stamp: str, final: Path, device) -> list[dict[str, Any]]:
    """Phase 1 proper: the student learns from the teacher (resumable); returns the history."""
    phase = Phase(
        "distill",
        params.train.distill,
        [{"params": list(model.student.parameters())}],
        distill_step(model, params.loss, device),
        paths.resume_checkpoint(final),
        model_spec(params),
        stamp,
        params.runtime.seed,
    )
    return fit(phase, model, train_dataset(params, train, params.runtime.seed), progress_enabled(params))


def fill_memory_bank(params: Params, model, train: list, val: list, device) -> dict[str, Any]:
    """The memory bank of the normal training images' teacher features (coreset); its map scale from
    the held-out normal images. Returns what was built (positions seen, entries kept, scale)."""
    cfg = params.model.memory_bank

    def on_device(samples: list) -> list:
        return [batch.to(device) for batch in normal_batches(samples, params)]

    built = build_bank(
        model.memory,
        lambda batch: model.teacher(model.pad(batch)),  # as at prediction: padded to whole patches
        on_device(train),
        on_device([s for s in val if s.label == 0]),
        cfg.coreset_ratio,
        cfg.max_entries,
        cfg.projection_dim,
        params.runtime.seed,
        cfg.max_positions,
    )
    logger.info("memory bank: %(entries)d of %(positions)d positions kept, scale %(scale).4f", built)
    return built


def normal_batches(samples: list, params: Params) -> list:
    """The normal training images as normalised batches at the model input size (no synthetic anomalies);
    a batch holds images of one size."""
    import torch

    dataset = LabelledDataset(samples, params_geometry(params), input_normalizer(params))
    batches = same_size_batches(dataset, params.train.distill.batch_size)
    return [torch.stack([item["image"] for item in batch]) for batch in batches]


def load_trained_student(params: Params, category: str, spec: dict[str, Any]):
    """The model with the teacher and student of stage 1 (PSM freshly initialised)."""
    student = read_checkpoint(paths.student_checkpoint(params, category))
    check_checkpoint_category(paths.student_checkpoint(params, category), student, category)
    if student["spec"]["model"] | {"psm_head_channels": None} != spec["model"] | {"psm_head_channels": None}:
        raise CheckpointError(
            f"{paths.student_checkpoint(params, category)} was trained with model params {student['spec']['model']} "
            f"but params say {spec['model']}: rerun `adps distill --category {category}` first."
        )
    with seeded(params.runtime.seed + 1):
        model = build_model(spec)
    kept = {k: v for k, v in student["state"].items() if k.startswith(("teacher.", "student.", "memory."))}
    loaded = model.load_state_dict(kept, strict=False)  # the PSM is new; teacher, student and bank must be complete
    missing = [k for k in loaded.missing_keys if not k.startswith("psm.")]
    if missing or loaded.unexpected_keys:
        raise CheckpointError(
            f"{paths.student_checkpoint(params, category)} does not hold a complete teacher and student "
            f"(missing {missing[:3]}, unexpected {loaded.unexpected_keys[:3]}): rerun `adps distill -c {category}`."
        )
    return model, student


@writes_category
@alone_in_process
def psm(params: Params, category: str, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Stage ``psm@C``: train the Post-Segmentation Module through the WMB; writes models/C/psm.pt
    (for a memory bank alone, nothing to train: the bank is carried over).

    ``on_epoch_end(epoch, model)`` runs after each epoch (the tuner reports validation values there).
    """
    device = setup_torch(params)
    train, _, _ = category_splits(params, category)
    spec = model_spec(params)
    model, student = load_trained_student(params, category, spec)
    model.to(device)
    final = paths.psm_checkpoint(params, category)
    stamp = phase_fingerprint(params, category, "psm", train) + student["fingerprint"]
    history = [] if model.kind == MEMORY_BANK else train_psm(params, model, train, stamp, final, device, on_epoch_end)
    finish_phase(
        params,
        final,
        model,
        spec,
        history,
        category,
        "psm",
        teacher_weights=student["teacher_weights"],
        fingerprint=stamp,
    )
    result = {"checkpoint": str(final), "epochs": len(history), "teacher_weights": student["teacher_weights"]}
    return result | ({"final_loss": history[-1]["loss_seg"]} if history else {})


def train_psm(
    params: Params, model, train: list, stamp: str, final: Path, device, on_epoch_end: EpochHook | None
) -> list[dict[str, Any]]:
    """Phase 2 proper: the PSM learns through the WMB (resumable); returns the history."""
    phase = Phase(
        "psm",
        params.train.psm,
        psm_param_groups(model, params.train.psm),
        psm_step(model, params.loss, params.train.psm, device),
        paths.resume_checkpoint(final),
        model_spec(params),
        stamp,
        params.runtime.seed + 1,
    )
    dataset = train_dataset(params, train, params.runtime.seed + 1)
    return fit(phase, model, dataset, progress_enabled(params), on_epoch_end)


def check_trained_with(params: Params, checkpoint: dict[str, Any], path: Path, category: str) -> None:
    """Refuse a checkpoint whose model or preprocessing differ from what the params say."""
    differ = differing_values(model_spec(params), checkpoint["spec"])
    if differ:
        details = "; ".join(f"{k}: checkpoint {found!r}, params {wanted!r}" for k, wanted, found in differ)
        raise CheckpointError(
            f"{path} does not match the params ({details}): retrain with "
            f"`adps distill -c {category}` and `adps psm -c {category}` (or `dvc repro`)."
        )


def differing_values(wanted: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, wanted, found) for each value of ``wanted`` that ``found`` lacks or holds otherwise."""
    differ = []
    for key, value in wanted.items():
        other = found.get(key) if isinstance(found, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            differ += differing_values(value, other, f"{prefix}{key}.")
        elif value != other:
            differ.append((f"{prefix}{key}", value, other))
    return differ


@writes_category
@alone_in_process
def evaluate(params: Params, category: str) -> dict[str, Any]:
    """Stage ``evaluate@C``: thresholds on the validation split, metrics, curves and heatmaps on test.

    Writes models/C/thresholds.json, reports/metrics/C.json, reports/plots/C/ and reports/heatmaps/C/,
    all together: a failure leaves the previous ones as they were.
    """
    device = setup_torch(params)
    _, val, test = category_splits(params, category)
    model, checkpoint = load_model(paths.psm_checkpoint(params, category))
    check_checkpoint_category(paths.psm_checkpoint(params, category), checkpoint, category)
    check_trained_with(params, checkpoint, paths.psm_checkpoint(params, category), category)
    model.to(device)
    batch, progress = params.evaluation.batch_size, progress_enabled(params)
    test_dataset = LabelledDataset(test, params_geometry(params), input_normalizer(params))
    val_preds, scorings = score_each_kind(
        model, params.score.model_dump(mode="json"), lambda m: validation_predictions(m, val, params, device, progress)
    )
    kind, why = choose_kind(params.model.kind, val_preds)
    test_preds = {}
    for held, scoring in scorings.items():
        test_preds[held] = predict_dataset(model.set_scoring(**scoring), test_dataset, batch, device, progress)
    val_pred, test_pred = val_preds[kind], test_preds[kind]
    thresholds = reports.calibrate(val_pred, params.threshold, scorings[kind])
    thresholds.update(category=category, checkpoint_sha256=file_sha256(paths.psm_checkpoint(params, category)))
    metrics = reports.evaluation_report(test_pred, thresholds, params.evaluation)
    metrics.update(teacher_weights=checkpoint["teacher_weights"], n_val=len(val_pred.labels))
    metrics.update(category=category, checkpoint_sha256=thresholds["checkpoint_sha256"])  # what they measured
    metrics.update(kind=kind, kind_choice=why, kinds=kind_table(test_preds, val_preds))
    logger.info("%s ships %s (%s)", category, kind, why)
    reference = production_reference(model, checkpoint["spec"], thresholds, val + test, params, device)
    built = {}

    def heatmaps(tmp: Path) -> None:
        reports.write_heatmaps(tmp, test_pred, thresholds["pixel"], params.evaluation.n_heatmaps)
        built["heatmaps"] = tmp

    def plots(tmp: Path) -> None:
        reports.write_curves(tmp, test_pred, params.evaluation.curve_points)
        reports.save_heatmap_grid(tmp / "heatmaps.png", built["heatmaps"])

    write_together(
        {paths.heatmaps_dir(params, category): heatmaps, paths.plots_dir(params, category): plots},
        {
            paths.thresholds_file(params, category): json_text(thresholds),
            paths.metrics_file(params, category): json_text(metrics),
            paths.reference_file(params, category): json_text(reference),
        },
    )
    return {"metrics": str(paths.metrics_file(params, category)), **{k: metrics[k] for k in METRIC_NAMES}}


def production_reference(
    model, spec: dict[str, Any], thresholds: dict[str, Any], samples: list, params: Params, device
) -> dict[str, Any]:
    """What the drift monitor compares production with: the deployable model (weights + these thresholds)
    on the held-out normal images of ``samples``, through the code that answers and logs a prediction."""
    from adps.inference import Predictor, TorchEngine
    from adps.production.drift import build_reference

    predictor = Predictor(TorchEngine(model, spec, thresholds["score"], str(device)), thresholds)
    normals = [s.image_path for s in samples if s.label == 0]
    return build_reference(predictor.predict_paths(normals, params.evaluation.batch_size), thresholds)


@writes_category
@alone_in_process
def export(params: Params, category: str) -> dict[str, Any]:
    """Stage ``export@C``: the deployable model as ONNX (models/C/model.onnx), metadata inside."""
    from adps.export import export_onnx

    check_category(params, category)
    check_model_folder(params, category)
    return export_onnx(paths.model_dir(params, category), paths.onnx_file(params, category))


@writes_category
@alone_in_process  # it scores the champion and this version on the test split (torch)
def register(params: Params, category: str) -> dict[str, Any]:
    """Stage ``register@C``: MLflow run + pyfunc model registered as ``adps-<C>`` (alias challenger).

    Everything is checked before the tracking server is touched: the category, that the model and its
    evaluation exist, and that they are one model of this category (psm.pt trained for it, thresholds,
    metrics and drift reference of that psm.pt): a failed check leaves no run or version behind.
    """
    from adps import tracking

    check_category(params, category)
    needed = [
        paths.psm_checkpoint(params, category),
        paths.thresholds_file(params, category),
        paths.metrics_file(params, category),
    ]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise AdpsError(
            f"cannot register {category}: missing {', '.join(missing)}; run `adps psm -c {category}` and "
            f"`adps evaluate -c {category}` (or `dvc repro`) first."
        )
    check_model_folder(params, category, reports=True)
    return tracking.register(params, category)


@writes_category
def promote(params: Params, category: str, version: str) -> dict[str, Any]:
    """Move the ``champion`` alias of ``adps-<C>`` to ``version`` (what the MLflow UI does by hand)."""
    from adps import tracking

    check_category(params, category)
    return tracking.promote(params, category, version)


def summarize(params: Params) -> tuple[dict[str, Any], dict[str, str]]:
    """Per-category model kind and headline metrics from reports/metrics (categories not evaluated yet are
    skipped), and a note for each category whose pixel metrics leave out defect images without a mask."""
    rows, notes = {}, {}
    for category in params.data.categories:
        path = paths.metrics_file(params, category)
        if path.is_file():
            try:
                metrics = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise AdpsError(f"{path} is not valid JSON ({err}): rerun `adps evaluate -c {category}`.") from err
            rows[category] = {"kind": metrics.get("kind", "adps"), **{k: metrics.get(k) for k in METRIC_NAMES}}
            if metrics.get("n_test_anomalous_masked", 0) != metrics.get("n_test_anomalous", 0):
                notes[category] = reports.pixel_coverage(metrics)
    return rows, notes


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as the CLI, the Prefect flow and ``dvc.yaml`` all know it.

    ``params``: the params keys and sections it reads (dvc.yaml's ``params``); ``outs``: every file
    or folder it writes for a category (dvc.yaml's ``outs``, ``metrics`` and ``plots``).
    ``tests/unit/test_stage_table.py`` checks dvc.yaml against this table.
    """

    name: str
    run: Callable[..., dict[str, Any]]
    per_category: bool
    summary: str
    params: tuple[str, ...]
    outs: Callable[[Params, str], list[Path]]


PIPELINE: tuple[Stage, ...] = (
    Stage(
        "prepare",
        prepare,
        False,
        "Build the embedded synthetic dataset, or import MVTec AD, KolektorSDD2 or a folder set.",
        (
            "runtime.seed",
            "data.source",
            "data.categories",
            "data.import_path",
            "data.folder",
            "data.mask_threshold",
            "data.empty_defect_mask",
            "synthetic",
        ),
        lambda params, category: [paths.dataset_dir(params)],
    ),
    Stage(
        "validate",
        validate,
        True,
        "Check a category's images with Great Expectations; exit 1 and list every bad file on failure.",
        ("validation",),
        lambda params, category: [
            paths.data_docs_dir(params, category),
            paths.validation_metadata_csv(params, category),
            paths.validation_failures_csv(params, category),
            paths.validation_summary(params, category),
        ],
    ),
    Stage(
        "distill",
        distill,
        True,
        "Stage 1: asymmetric distillation of the student; writes models/<category>/student.pt (resumable).",
        (
            "runtime.seed",
            "runtime.threads",
            "runtime.cpu_kernels",
            "runtime.device",
            "data.image_size",
            "data.resolution",
            "data.scale",
            "data.normalize_mean",
            "data.normalize_std",
            "data.val_fraction",
            "anomalies",
            "model",
            "loss.push_weight",
            "loss.push_floor",
            "loss.mask_threshold",
            "train.distill",
        ),
        lambda params, category: [
            paths.student_checkpoint(params, category),
            paths.train_history(params, category, "distill"),
        ],
    ),
    Stage(
        "psm",
        psm,
        True,
        "Stage 2: train the Post-Segmentation Module through the WMB; writes models/<category>/psm.pt (resumable).",
        (
            "runtime.seed",
            "runtime.threads",
            "runtime.cpu_kernels",
            "runtime.device",
            "data.image_size",
            "data.resolution",
            "data.scale",
            "data.normalize_mean",
            "data.normalize_std",
            "data.val_fraction",
            "anomalies",
            "model",
            "loss",
            "train.psm",
        ),
        lambda params, category: [paths.psm_checkpoint(params, category), paths.train_history(params, category, "psm")],
    ),
    Stage(
        "evaluate",
        evaluate,
        True,
        "Choose thresholds on the validation split, compute test metrics, curves and heatmaps.",
        (
            "runtime.seed",
            "runtime.threads",
            "runtime.cpu_kernels",
            "data.image_size",
            "data.resolution",
            "data.scale",
            "data.val_fraction",
            "data.val_defect_fraction",
            "anomalies",
            "model.kind",
            "score",
            "threshold",
            "evaluation",
        ),
        lambda params, category: [
            paths.thresholds_file(params, category),
            paths.reference_file(params, category),
            paths.heatmaps_dir(params, category),
            paths.metrics_file(params, category),
            *paths.plot_files(params, category),
        ],
    ),
    Stage(
        "export",
        export,
        True,
        "Export the category's deployable model to models/<category>/model.onnx (ONNX Runtime, no PyTorch).",
        (),
        lambda params, category: [paths.onnx_file(params, category)],
    ),
    Stage(
        "register",
        register,
        True,
        "Log the category's MLflow run and register its model as adps-<category> (alias challenger).",
        ("tracking", "registry"),
        lambda params, category: [paths.registry_record(params, category)],
    ),
)


def pipeline_stage(name: str) -> Stage:
    """The stage named ``name`` of :data:`PIPELINE`."""
    return next(stage for stage in PIPELINE if stage.name == name)
