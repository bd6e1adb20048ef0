"""Training-free floor: nearest-neighbour distance on the teacher's features, no training at all.

Usage: ``python -m benchmarks.knn_floor [--params params.yaml]`` after ``adps prepare``.

The teacher of ``params.yaml`` (same backbone, weights and input size as the pipeline) embeds every
normal training image; levels 2 and 3 (stride 8 and 16, the latter upsampled to stride 8) are
concatenated into one feature per position. A test pixel's anomaly value is the L2 distance of its
position's feature to the nearest feature in that bank, upsampled to the image size; the image score
and every metric come from the pipeline's own scorer and evaluation code, and its thresholds are chosen
on the validation split as the pipeline's are. The pipeline's default model must beat this.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adps import stages
from adps.config import Params, load_params
from adps.data.datasets import LabelledDataset
from adps.data.splits import category_splits
from adps.evaluation import reports
from adps.evaluation.predictions import predict_dataset, validation_predictions
from adps.model.memory_bank import NearestNeighbourMap, position_features
from adps.model.network import AdpsModel
from adps.model.weights import load_teacher_weights
from adps.training.checkpoints import input_normalizer, params_geometry

LEVELS = (1, 2)  # 0-based: stride 8 and stride 16


@torch.no_grad()
def feature_bank(model: AdpsModel, params: Params, train: list) -> torch.Tensor:
    """(N, C): one feature per position of every normal training image (the whole bank, no coreset)."""
    batches = stages.normal_batches(train, params)
    feats = [position_features(model.teacher(b), LEVELS) for b in batches]
    return torch.cat([f.permute(0, 2, 3, 1).flatten(0, 2) for f in feats])


def knn_maps(bank: torch.Tensor):
    nearest = NearestNeighbourMap(bank)

    def map_fn(model: AdpsModel, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = nearest(position_features(model.teacher(image), LEVELS))
        anomaly_map = F.interpolate(distances, size=image.shape[-2:], mode="bilinear")
        return anomaly_map, model.scorer(anomaly_map)

    return map_fn


def knn_floor(params: Params, category: str) -> dict[str, Any]:
    """The floor's test metrics, with its image and pixel thresholds chosen on the validation split
    (held-out normals + synthetic anomalies) exactly as the pipeline chooses its own."""
    model = AdpsModel(params.model.backbone, 1, (0,), params.model.psm_head_channels, params.score.model_dump()).eval()
    model.set_scoring(**params.score.model_dump())
    record = load_teacher_weights(model.teacher.net, params.model.backbone, params.model.teacher_weights)
    train, val, test = category_splits(params, category)
    map_fn, cpu = knn_maps(feature_bank(model, params, train)), torch.device("cpu")
    test_dataset = LabelledDataset(test, params_geometry(params), input_normalizer(params))
    test_pred = predict_dataset(model, test_dataset, params.evaluation.batch_size, cpu, map_fn=map_fn)
    val_pred = validation_predictions(model, val, params, cpu, map_fn=map_fn)
    thresholds = reports.calibrate(val_pred, params.threshold, params.score.model_dump(mode="json"))
    return {**reports.evaluation_report(test_pred, thresholds, params.evaluation), "teacher_weights": record}


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    params = load_params(parser.parse_args().params)
    rows = {category: knn_floor(params, category) for category in params.data.categories}
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
    rows["mean"] = {k: mean_of([r[k] for r in rows.values()]) for k in keys}
    print(f"teacher: {params.model.backbone}, {rows[params.data.categories[0]]['teacher_weights']}\n")
    print("| category | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(cell(row[k]) for k in keys) + " |")


def mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


if __name__ == "__main__":
    main()
