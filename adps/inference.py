"""Prediction with a trained model: load once, batch, write a CSV row and a heatmap per image.

A model folder (``models/<category>``) holds ``psm.pt`` (weights, model and preprocessing params)
and ``thresholds.json`` (chosen on the validation split); nothing else is needed, not even
params.yaml.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from adps.data.datasets import Normalizer
from adps.data.images import InputGeometry, read_rgb
from adps.errors import AdpsError, ImageReadError
from adps.evaluation.heatmaps import heatmap_panel, save_heatmap
from adps.files import (
    build_dir,
    exclusive_lock,
    file_sha256,
    replace_dir_atomically,
    swap_in_dir,
    write_text_atomically,
)
from adps.model.network import at_size, score_input_problem
from adps.paths import PSM_FILE, THRESHOLDS_FILE
from adps.runtime import resolve_device
from adps.training.checkpoints import input_geometry, load_model

logger = logging.getLogger(__name__)
CSV_COLUMNS = ("path", "score", "is_anomalous", "threshold", "heatmap", "error")
THRESHOLD_KEYS = ("image", "pixel", "score", "checkpoint_sha256")
MAX_BATCH_PIXELS = 4 * 1024 * 1024  # images of one size go through the model together up to this many pixels


@dataclass
class ImageSource:
    """One input: a file path or the image file's bytes; ``error`` set when it was refused before reading."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    error: str = ""


@dataclass
class ImagePrediction:
    """One image's result; ``error`` is set (and the rest empty) when the image could not be read.

    ``image``: the model input (H, W, 3); ``anomaly_map``: (height, width) at the image's own size
    ``original_size`` = (width, height), whatever size the model saw.
    """

    path: str
    score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    anomaly_map: np.ndarray | None = None
    image: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    features: np.ndarray | None = None
    error: str = ""


class TorchEngine:
    """The forward pass in PyTorch: the ADPS model with its input normalisation, on a device."""

    def __init__(self, model: torch.nn.Module, spec: dict[str, Any], score: dict[str, Any], device: str = "cpu"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().set_scoring(**score)
        self.geometry = input_geometry(spec)
        self.normalize = Normalizer(spec["normalize_mean"], spec["normalize_std"])
        self.teacher_out = threading.local()  # per thread: a server may run requests in several threads at once
        self.model.teacher.register_forward_hook(lambda _m, _input, out: setattr(self.teacher_out, "last", out[-1]))

    def to(self, device: str) -> None:
        self.device = resolve_device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Images of one size (H, W, 3) in [0, 1] -> maps (N, H, W), scores (N,) and the teacher's deepest
        level averaged over positions (N, C), read off the same forward pass (the drift monitor's features)."""
        batch = torch.stack([self.normalize(img) for img in images]).to(self.device)
        self.teacher_out.last = None
        out = self.model(batch)
        teacher = self.teacher_out.last
        pooled = None if teacher is None else teacher.mean(dim=(2, 3)).cpu().numpy()
        return out.anomaly_map[:, 0].cpu().numpy(), out.image_score.cpu().numpy(), pooled


class PredictionRecorder(Protocol):
    """Where predictions are recorded (:class:`adps.production.log.PredictionLog`): queued, never waited for."""

    enabled: bool
    counts: dict[str, int]

    def record(
        self, results: list[ImagePrediction], sources: list[ImageSource], thresholds: dict[str, Any]
    ) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool: ...


class Engine(Protocol):
    """What a :class:`Predictor` runs: how images become its input (``geometry``) and its forward pass on a
    batch of images of one size."""

    geometry: InputGeometry

    def to(self, device: str) -> None: ...

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...


class Predictor:
    """A loaded model (an :class:`Engine`: PyTorch, or ONNX Runtime in :mod:`adps.export`) with its thresholds."""

    def __init__(self, engine: Engine, thresholds: dict[str, Any]):
        self.engine = engine
        self.geometry = engine.geometry
        self.thresholds = thresholds

    @classmethod
    def from_dir(cls, model_dir: Path, device: str = "auto") -> Predictor:
        """Load ``psm.pt`` and ``thresholds.json`` from a model folder (or the folder of a given psm.pt).

        The two files must belong together: thresholds.json records the sha256 of the psm.pt it was
        chosen for, so a checkpoint copied in from another category is refused.
        """
        model_dir = Path(model_dir)
        if model_dir.suffix == ".pt" and model_dir.name != PSM_FILE:
            raise AdpsError(
                f"{model_dir} is not a deployable model (that is psm.pt with thresholds.json beside it): "
                f"give the model folder, e.g. --model {model_dir.parent}"
            )
        folder = model_dir.parent if model_dir.suffix == ".pt" else model_dir
        thresholds = read_thresholds(folder / THRESHOLDS_FILE)
        model, payload = load_model(folder / PSM_FILE)
        check_model_pair(folder, payload, thresholds)
        try:
            engine = TorchEngine(model, payload["spec"], thresholds["score"], device)
        except (TypeError, ValueError) as err:  # a score (kind, method...) this model cannot answer with
            raise AdpsError(
                f"{folder / THRESHOLDS_FILE} has a score this psm.pt cannot use ({err}): run `adps evaluate` again."
            ) from err
        return cls(engine, thresholds)

    def to(self, device: str) -> Predictor:
        """Move the model to ``device`` (auto, cpu or cuda)."""
        self.engine.to(device)
        return self

    def predict_arrays(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """(H_i, W_i, 3) float images in [0, 1] at the model input size -> maps [(H_i, W_i)] and scores (N,).

        Images of one size go through the engine together, in batches of their own of at most
        :data:`MAX_BATCH_PIXELS` pixels (at least one image), so memory follows the image size, not the batch.
        """
        maps, scores, _ = self.run_engine(images)
        return maps, scores

    def run_engine(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray | None]]:
        """:meth:`predict_arrays`, with each image's pooled teacher features (None from an engine without them)."""
        maps: list[np.ndarray] = [np.empty(0)] * len(images)
        features: list[np.ndarray | None] = [None] * len(images)
        scores = np.zeros(len(images), np.float32)
        for shape in dict.fromkeys(image.shape for image in images):
            same = [i for i, image in enumerate(images) if image.shape == shape]
            per_batch = max(1, MAX_BATCH_PIXELS // (shape[0] * shape[1]))  # memory grows with the pixels at once
            for start in range(0, len(same), per_batch):
                group = same[start : start + per_batch]
                group_maps, group_scores, pooled = self.engine([images[i] for i in group])
                for j, i in enumerate(group):
                    maps[i], scores[i] = group_maps[j], group_scores[j]
                    features[i] = None if pooled is None else pooled[j]
        return maps, scores, features

    def read(self, source: ImageSource) -> ImagePrediction:
        if source.error:
            return ImagePrediction(source.name, error=source.error)
        try:
            raw = io.BytesIO(source.data) if source.data is not None else source.path
            image, original = read_rgb(raw, self.geometry, source.name)
        except ImageReadError as err:
            logger.warning("skipping unreadable image: %s", err)
            return ImagePrediction(source.name, error=str(err))
        if problem := score_input_problem(*image.shape[:2], **self.thresholds["score"]):
            logger.warning("skipping %s: %s", source.name, problem)
            return ImagePrediction(source.name, error=f"cannot score {source.name}: {problem}")
        return ImagePrediction(source.name, image=image, original_size=original)

    def predict_paths(self, paths: list[Path], batch_size: int = 16) -> list[ImagePrediction]:
        """Predict every path; unreadable files come back with ``error`` set and do not stop the rest."""
        sources = [ImageSource(str(p), path=Path(p)) for p in paths]
        return [
            r
            for start in range(0, len(sources), batch_size)
            for r in self.predict_batch(sources[start : start + batch_size])
        ]

    def predict_batch(self, sources: list[ImageSource]) -> list[ImagePrediction]:
        """Decode and score one batch (memory holds one batch at a time); errors stay on their row."""
        results = [self.read(s) for s in sources]
        readable = [r for r in results if not r.error]
        if readable:
            threshold = float(self.thresholds["image"])
            maps, scores, features = self.run_engine([r.image for r in readable])
            for r, anomaly_map, score, pooled in zip(readable, maps, scores, features, strict=True):
                r.anomaly_map = at_size(torch.from_numpy(anomaly_map), r.original_size[::-1]).numpy()
                r.score, r.threshold, r.features = float(score), threshold, pooled
                r.is_anomalous = bool(score >= threshold)
        return results

    def regions(self, result: ImagePrediction) -> list[dict[str, Any]]:
        """The result's defect regions (see :func:`defect_regions`) at the pixel threshold."""
        return defect_regions(result.anomaly_map, float(self.thresholds["pixel"]), result.original_size)


def defect_regions(anomaly_map: np.ndarray, threshold: float, image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Connected regions of ``anomaly_map >= threshold``, strongest first, in the input image's pixels.

    Each: ``x, y, width, height`` (bounding box), ``area`` (pixels of the region), ``peak`` (highest score).
    """
    labels, _ = ndimage.label(anomaly_map >= threshold)
    scale_x, scale_y = image_size[0] / anomaly_map.shape[1], image_size[1] / anomaly_map.shape[0]
    regions = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == index
        rows, cols = box
        regions.append(
            {
                "x": round(cols.start * scale_x),
                "y": round(rows.start * scale_y),
                "width": round((cols.stop - cols.start) * scale_x),
                "height": round((rows.stop - rows.start) * scale_y),
                "area": round(float(inside.sum()) * scale_x * scale_y),
                "peak": float(anomaly_map[box][inside].max()),
            }
        )
    return sorted(regions, key=lambda region: -region["peak"])


def read_thresholds(path: Path) -> dict[str, Any]:
    """thresholds.json of a model folder, checked for the keys prediction needs."""
    if not path.is_file():
        raise AdpsError(f"no thresholds.json in {path.parent}: run `adps evaluate` for this category first.")
    try:
        thresholds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdpsError(f"{path} is not valid JSON ({err}): run `adps evaluate` again to rewrite it.") from err
    missing = [k for k in THRESHOLD_KEYS if not isinstance(thresholds, dict) or k not in thresholds]
    if missing:
        raise AdpsError(f"{path} lacks {', '.join(missing)}: run `adps evaluate` again to rewrite it.")
    return thresholds


def check_model_pair(folder: Path, checkpoint: dict[str, Any], thresholds: dict[str, Any]) -> None:
    """psm.pt is a stage-2 checkpoint, and thresholds.json was chosen for exactly this file."""
    if checkpoint.get("phase") != "psm":
        raise AdpsError(
            f"{folder / 'psm.pt'} is a '{checkpoint.get('phase')}' checkpoint, not a trained PSM: "
            "run `adps psm` and `adps evaluate` for this category."
        )
    recorded = thresholds.get("checkpoint_sha256")
    if recorded != file_sha256(folder / PSM_FILE):
        owner = checkpoint.get("category", "another category")
        raise AdpsError(
            f"{folder / 'psm.pt'} is not the checkpoint {folder / 'thresholds.json'} was chosen for "
            f"(it was trained for {owner}); restore the folder from DVC (`dvc checkout`), or rerun "
            f"`adps evaluate` for {owner} to choose thresholds for this psm.pt."
        )


def collect_inputs(source: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """A file, or every entry under a folder, recursively (hidden names and the ``exclude`` folders skipped).

    Anything that is not a folder is listed, broken links and non-images included, so it gets a row
    with its error; links to folders are not followed (a link loop cannot hang the walk). ``exclude``:
    this run's own output folders, when they lie inside the input (never read back as inputs).
    """
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise AdpsError(f"input not found: {source}")
    skipped = {p.resolve() for p in exclude}

    def read(folder: Path) -> bool:
        return not folder.name.startswith(".") and folder.resolve() not in skipped and not is_output(folder)

    found = []
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs[:] = sorted(d for d in dirs if read(Path(root) / d))
        found += [Path(root) / name for name in sorted(files) if not name.startswith(".")]
        found += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
    if not found:
        raise AdpsError(f"no files in {source}: give an image file or a folder of images.")
    return sorted(found)


def is_output(folder: Path) -> bool:
    """Whether a folder was written by ``adps predict`` (predictions or maps): never read back as input."""
    markers = (folder / OUTPUT_MARKER).is_file() or (folder / MAPS_MARKER).is_file()
    return markers or ((folder / "predictions.csv").is_file() and (folder / "heatmaps").is_dir())  # older outputs


def check_folders(source: Path, output: Path, save_maps: Path | None, model_dir: Path | None) -> None:
    """Outputs are replaced whole: what is read (input, model) may not lie inside them; maps nest only in the output.

    An output inside the input folder is fine: it is skipped when the input is read.
    """
    outputs = [("--output", output.resolve())] + ([("--save-maps", save_maps.resolve())] if save_maps else [])
    read = [("--input", source), ("--model", model_dir)]
    for flag, target in outputs:
        for what, path in read:
            if path is not None and path.resolve().is_relative_to(target):
                raise AdpsError(
                    f"{what} {path} lies inside {flag} {target}, which `adps predict` replaces whole: "
                    f"choose a {flag} folder outside it"
                )
    if (
        save_maps is not None
        and output.resolve().is_relative_to(save_maps.resolve())
        and not nested_maps(output, save_maps)
    ):
        raise AdpsError(
            f"--output {output} lies inside --save-maps {save_maps}: put the maps inside the output (e.g. "
            f"--save-maps {output / 'maps'}) or in a folder of their own"
        )


def nested_maps(output: Path, save_maps: Path | None) -> bool:
    """Whether the maps folder is the output folder or inside it (then it is built as part of the output)."""
    return save_maps is not None and save_maps.resolve().is_relative_to(output.resolve())


def predictions_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def output_name(path: Path, source: Path) -> Path:
    """The input's path relative to the input folder, suffix kept (``a/x.png`` and ``b/x.jpg`` stay apart)."""
    return path.relative_to(source) if source.is_dir() else Path(path.name)


def check_output(output: Path, marker: str = "predictions.csv") -> None:
    """Fail before any scoring when an output folder cannot be (re)written (``marker``: a file only we write)."""
    if output.is_symlink():
        raise AdpsError(f"output {output} is a symbolic link: give a real folder (it is replaced whole).")
    if output.exists() and not output.is_dir():
        raise AdpsError(f"output {output} is a file: give a folder.")
    if output.is_dir() and any(output.iterdir()) and not (output / marker).is_file():
        raise AdpsError(
            f"output {output} is a non-empty folder that `adps predict` did not write; "
            "give a new or empty folder (its contents would be replaced)."
        )
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AdpsError(f"cannot write in {parent}: choose an --output folder you can write to.")


def output_lock(output: Path):
    """One ``adps predict`` per output folder at a time (a lock file beside it)."""
    lock_path = output.absolute().parent / f".{output.name}.lock"
    return exclusive_lock(
        lock_path, f"another `adps predict` is writing to {output}; wait for it or choose another --output"
    )


def predict_to_folder(
    predictor: Predictor,
    source: Path,
    output: Path,
    batch_size: int = 16,
    progress: bool = False,
    save_maps: Path | None = None,
    model_dir: Path | None = None,
    log: PredictionRecorder | None = None,
) -> dict[str, Any]:
    """Predict ``source`` (file or folder, recursively); write ``predictions.csv`` and ``heatmaps/<relative path>.png``.

    Images are decoded, scored and drawn one batch at a time. The output folder is built beside the
    target and swapped in when complete: it never mixes files of two runs. ``save_maps`` gets each raw
    anomaly map as float32 ``<relative path>.npy`` (the image's own resolution), for re-scoring elsewhere; it may
    lie inside the output. Outputs inside the input are never read as inputs; an input or model
    (``model_dir``) inside an output is refused before anything runs. Each prediction is recorded in
    ``log`` when given (its counts are in the summary).
    """
    if batch_size < 1:
        raise AdpsError(f"--batch-size must be at least 1 (got {batch_size})")
    check_folders(source, output, save_maps, model_dir)
    inputs = collect_inputs(source, exclude=tuple(p for p in (output, save_maps) if p is not None))
    check_output(output)
    nested = nested_maps(output, save_maps)
    if save_maps is not None and not nested:
        check_output(save_maps, marker=MAPS_MARKER)
    summary: dict[str, Any] = {}
    job = PredictionJob(predictor, source, output, batch_size, progress, log)

    def build(tmp: Path, maps_tmp: Path | None = None) -> None:
        (tmp / OUTPUT_MARKER).write_text("adps predict output\n")
        if nested:
            maps_tmp = tmp / save_maps.resolve().relative_to(output.resolve())
            maps_tmp.mkdir(parents=True, exist_ok=True)
            (maps_tmp / MAPS_MARKER).write_text("adps predict maps\n")
        summary.update(job.write(inputs, tmp, maps_tmp))

    with output_lock(output):
        if save_maps is None or nested:
            replace_dir_atomically(output, build)
        else:
            with output_lock(save_maps):
                maps_tmp = build_dir(save_maps, lambda tmp: (tmp / MAPS_MARKER).write_text("adps predict maps\n"))
                try:
                    replace_dir_atomically(output, lambda tmp: build(tmp, maps_tmp))
                except BaseException:
                    shutil.rmtree(maps_tmp, ignore_errors=True)
                    raise
                swap_in_dir(maps_tmp, save_maps)
    if log is not None and log.enabled:
        log.flush()
        summary["log"] = dict(log.counts)
    return {"predictions": str(output / "predictions.csv"), **summary}


MAPS_MARKER = ".adps-maps"
OUTPUT_MARKER = ".adps-predictions"


@dataclass
class PredictionJob:
    """Rows, heatmaps and raw maps of one ``adps predict``, written into temp folders batch by batch."""

    predictor: Predictor
    source: Path
    output: Path
    batch_size: int
    progress: bool
    log: PredictionRecorder | None = None

    def write(self, inputs: list[Path], folder: Path, maps_folder: Path | None) -> dict[str, Any]:
        rows, failed, anomalous = [], [], 0
        sources = [ImageSource(str(p), path=p) for p in inputs]
        batches = range(0, len(sources), self.batch_size)
        for start in tqdm(batches, desc="predicting", unit="batch", disable=not self.progress):
            batch = sources[start : start + self.batch_size]
            results = self.predictor.predict_batch(batch)
            if self.log is not None:
                self.log.record(results, batch, self.predictor.thresholds)
            for r in results:
                heatmap = ""
                if r.error:
                    failed.append(r.path)
                else:
                    anomalous += bool(r.is_anomalous)
                    heatmap = self.save_outputs(r, folder, maps_folder)
                rows.append({k: getattr(r, k) for k in CSV_COLUMNS if k != "heatmap"} | {"heatmap": heatmap})
        write_text_atomically(folder / "predictions.csv", predictions_csv(rows))
        return {"n_images": len(rows), "n_anomalous": anomalous, "n_unreadable": len(failed), "unreadable": failed}

    def save_outputs(self, r: ImagePrediction, folder: Path, maps_folder: Path | None) -> str:
        """Heatmap PNG (and raw map) of one image, named by its path relative to the input folder."""
        name = output_name(Path(r.path), self.source)
        shown = at_size(torch.from_numpy(r.anomaly_map), r.image.shape[:2]).numpy()  # drawn at the model input size
        panel = heatmap_panel(r.image, shown, float(self.predictor.thresholds["pixel"]), None)
        save_heatmap(folder / "heatmaps" / f"{name}.png", panel, f"{name} score={r.score:.3f}")
        if maps_folder is not None:
            target = maps_folder / f"{name}.npy"
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, r.anomaly_map.astype(np.float32))
        return str(self.output / "heatmaps" / f"{name}.png")
