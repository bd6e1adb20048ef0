"""Any deployable model's test metrics on given images, so two models can be compared on the same ones.

``adps evaluate`` measures the model it has just trained; a version registered later may have been
trained and tested on other data. :func:`score_on_split` measures a loaded model (a
:class:`adps.inference.Predictor`, from a model folder or the registry) on any list of labelled
images with the metrics of ``adps evaluate``: each model reads the images by its own input rules,
its maps are compared with the masks at their stored size, and its own thresholds decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from adps.config import EvaluationParams
from adps.data.datasets import LabelledDataset, Normalizer, same_size_batches
from adps.data.images import InputGeometry
from adps.data.layout import Sample
from adps.errors import DatasetError
from adps.evaluation.predictions import Predictions, labelled_predictions
from adps.evaluation.reports import evaluation_report
from adps.model.network import at_size, score_input_problem

AS_READ = Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # a loaded model normalises its input itself


class LoadedModel(Protocol):
    """What scoring needs of a loaded model (:class:`adps.inference.Predictor` is one): its input rules,
    its thresholds.json and its forward pass on images of one size."""

    geometry: InputGeometry
    thresholds: dict[str, Any]

    def predict_arrays(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]: ...


def score_on_split(model: LoadedModel, samples: Sequence[Sample], cfg: EvaluationParams) -> dict[str, Any]:
    """The metrics ``adps evaluate`` reports (reports/metrics/<C>.json's keys), of ``model`` on ``samples``.

    Threshold-dependent metrics use the model's own thresholds; defect images without a mask count in
    the image metrics only (no mask at all: pixel metrics None), as in ``adps evaluate``.

    Raises:
        DatasetError: an image the model cannot read or score (named, with why).
    """
    return evaluation_report(split_predictions(model, samples, cfg.batch_size), model.thresholds, cfg)


def split_predictions(model: LoadedModel, samples: Sequence[Sample], batch_size: int) -> Predictions:
    """Maps (at each mask's stored size) and scores of ``model`` on ``samples``, a batch at a time."""
    dataset = LabelledDataset(samples, model.geometry, AS_READ)
    maps, scores, items = [], [], []
    for batch in same_size_batches(dataset, batch_size):
        if problem := score_input_problem(*batch[0]["image"].shape[-2:], **model.thresholds["score"]):
            raise DatasetError(f"cannot score {batch[0]['path']}: {problem}")
        batch_maps, batch_scores = model.predict_arrays([item["image"].permute(1, 2, 0).numpy() for item in batch])
        for item, anomaly_map in zip(batch, batch_maps, strict=True):
            maps.append(at_size(torch.from_numpy(anomaly_map), item["mask"].shape[-2:]).numpy())
        scores.append(np.asarray(batch_scores, np.float32))
        items += [{k: v for k, v in item.items() if k != "image"} for item in batch]
    return labelled_predictions(maps, np.concatenate(scores) if scores else np.zeros(0, np.float32), items)
