"""Training-free floor: nearest-neighbour distance on the teacher's features, no training at all.

Usage: ``python -m benchmarks.knn_floor [--params params.yaml]`` after ``adps prepare``.

The teacher of ``params.yaml`` (same backbone, weights and input size as the pipeline) embeds every
normal training image; levels 2 and 3 (stride 8 and 16, the latter upsampled to stride 8) are
concatenated into one feature per position. A test pixel's anomaly value is the L2 distance of its
position's feature to the nearest feature in that bank, upsampled to the image size; the image score
and every metric come from the pipeline's own scorer and evaluation code. ADPS must beat this.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from adps import stages
from adps.config import Params, load_params
from adps.data.datasets import LabelledDataset
from adps.data.splits import category_splits
from adps.evaluation.metrics import detection_metrics
from adps.evaluation.predictions import predict_dataset
from adps.model.network import AdpsModel
from adps.model.weights import load_teacher_weights
from adps.training.checkpoints import input_normalizer

LEVELS = (1, 2)  # 0-based: stride 8 and stride 16


def position_features(model: AdpsModel, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, H/8, W/8): teacher levels 2 and 3 at stride 8, concatenated."""
    feats = model.teacher(image)
    size = feats[LEVELS[0]].shape[-2:]
    return torch.cat([F.interpolate(feats[i], size=size, mode="bilinear", align_corners=False) for i in LEVELS], 1)


@torch.no_grad()
def feature_bank(model: AdpsModel, params: Params, train: list) -> torch.Tensor:
    """(N, C): one feature per position of every normal training image."""
    batches = stages.normal_batches(train, params)
    return torch.cat([position_features(model, b).permute(0, 2, 3, 1).flatten(0, 2) for b in batches])


def knn_maps(bank: torch.Tensor):
    def map_fn(model: AdpsModel, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = position_features(model, image)
        b, c, h, w = feats.shape
        queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
        nearest = torch.cat([torch.cdist(q, bank).min(dim=1).values for q in queries.split(4096)])
        anomaly_map = F.interpolate(nearest.view(b, 1, h, w), size=image.shape[-2:], mode="bilinear")
        return anomaly_map, model.scorer(anomaly_map)

    return map_fn


def knn_floor(params: Params, category: str) -> dict[str, float]:
    model = AdpsModel(params.model.backbone, 1, (0,), params.model.psm_head_channels, params.score.model_dump()).eval()
    model.set_scoring(**params.score.model_dump())
    record = load_teacher_weights(model.teacher.net, params.model.backbone, params.model.teacher_weights)
    train, _, test = category_splits(params, category)
    bank = feature_bank(model, params, train)
    pred = predict_dataset(
        model,
        LabelledDataset(test, params.data.image_size, input_normalizer(params)),
        params.evaluation.batch_size,
        torch.device("cpu"),
        map_fn=knn_maps(bank),
    )
    metrics = detection_metrics(pred.scores, pred.labels, pred.maps, pred.masks, params.evaluation.aupro_fpr_limit)
    return {**metrics, "teacher_weights": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    params = load_params(parser.parse_args().params)
    rows = {category: knn_floor(params, category) for category in params.data.categories}
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
    rows["mean"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    print(f"teacher: {params.model.backbone}, {rows[params.data.categories[0]]['teacher_weights']}\n")
    print("| category | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
