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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adps.data.datasets import Normalizer, load_rgb
from adps.errors import AdpsError, ImageReadError
from adps.evaluation.heatmaps import heatmap_panel, save_heatmap
from adps.files import write_text_atomically
from adps.training.checkpoints import load_model

logger = logging.getLogger(__name__)
CSV_COLUMNS = ("path", "score", "is_anomalous", "threshold", "heatmap", "error")


@dataclass
class ImagePrediction:
    """One image's result; ``error`` is set (and the rest empty) when the file could not be read."""

    path: str
    score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    anomaly_map: np.ndarray | None = None
    image: np.ndarray | None = None
    error: str = ""


class Predictor:
    """A loaded ADPS model with its preprocessing and thresholds."""

    def __init__(self, model: torch.nn.Module, spec: dict[str, Any], thresholds: dict[str, Any], device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().set_scoring(**thresholds["score"])
        self.size = spec["image_size"]
        self.normalize = Normalizer(spec["normalize_mean"], spec["normalize_std"])
        self.thresholds = thresholds

    @classmethod
    def from_dir(cls, model_dir: Path, device: str = "cpu") -> Predictor:
        """Load ``psm.pt`` and ``thresholds.json`` from a model folder (or the folder of a given psm.pt)."""
        model_dir = Path(model_dir)
        folder = model_dir.parent if model_dir.suffix == ".pt" else model_dir
        thresholds_path = folder / "thresholds.json"
        if not thresholds_path.is_file():
            raise AdpsError(f"no thresholds.json in {folder}: run `adps evaluate` for this category first.")
        model, payload = load_model(folder / "psm.pt")
        return cls(model, payload["spec"], json.loads(thresholds_path.read_text()), device)

    @torch.no_grad()
    def predict_arrays(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) float images in [0, 1] at the model size -> maps (N, H, W) and scores (N,)."""
        batch = torch.stack([self.normalize(img) for img in images]).to(self.device)
        out = self.model(batch)
        return out.anomaly_map[:, 0].cpu().numpy(), out.image_score.cpu().numpy()

    def read(self, path: Path) -> ImagePrediction:
        try:
            return ImagePrediction(str(path), image=load_rgb(path, self.size))
        except ImageReadError as err:
            logger.warning("skipping unreadable image: %s", err)
            return ImagePrediction(str(path), error=str(err))

    def predict_paths(self, paths: list[Path], batch_size: int = 16, progress: bool = False) -> list[ImagePrediction]:
        """Predict every path; unreadable files come back with ``error`` set and do not stop the rest."""
        results = [self.read(p) for p in paths]
        readable = [r for r in results if not r.error]
        threshold = float(self.thresholds["image"])
        chunks = range(0, len(readable), batch_size)
        for start in tqdm(chunks, desc="predicting", unit="batch", disable=not progress):
            chunk = readable[start : start + batch_size]
            maps, scores = self.predict_arrays([r.image for r in chunk])
            for r, anomaly_map, score in zip(chunk, maps, scores, strict=True):
                r.anomaly_map, r.score, r.threshold = anomaly_map, float(score), threshold
                r.is_anomalous = bool(score >= threshold)
        return results


def collect_inputs(source: Path) -> list[Path]:
    """A single file, or every file of a folder (non-image suffixes included: they are reported)."""
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        if files:
            return files
        raise AdpsError(f"no files in {source}: give an image file or a folder of images.")
    raise AdpsError(f"input not found: {source}")


def predictions_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def predict_to_folder(
    predictor: Predictor, source: Path, output: Path, batch_size: int = 16, progress: bool = False
) -> dict[str, Any]:
    """Predict ``source`` (file or folder); write ``predictions.csv`` and ``heatmaps/<name>.png``."""
    results = predictor.predict_paths(collect_inputs(source), batch_size, progress)
    rows = []
    for r in results:
        heatmap = ""
        if not r.error:
            panel = heatmap_panel(r.image, r.anomaly_map, float(predictor.thresholds["pixel"]), None)
            heatmap = str(
                save_heatmap(
                    output / "heatmaps" / f"{Path(r.path).stem}.png", panel, f"{Path(r.path).name} score={r.score:.3f}"
                )
            )
        rows.append(
            {
                "path": r.path,
                "score": r.score,
                "is_anomalous": r.is_anomalous,
                "threshold": r.threshold,
                "heatmap": heatmap,
                "error": r.error,
            }
        )
    csv_path = write_text_atomically(output / "predictions.csv", predictions_csv(rows))
    failed = [r.path for r in results if r.error]
    return {
        "predictions": str(csv_path),
        "n_images": len(results),
        "n_anomalous": sum(bool(r.is_anomalous) for r in results),
        "n_unreadable": len(failed),
        "unreadable": failed,
    }
