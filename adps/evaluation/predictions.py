"""Running a model over a dataset and collecting maps, scores and ground truth as numpy arrays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from adps.config import Params
from adps.data.datasets import ValidationDataset
from adps.model.network import AdpsModel
from adps.training.checkpoints import input_normalizer

MapFn = Callable[[AdpsModel, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Predictions:
    """maps (N, H, W) float32, scores (N,), masks (N, H, W) bool, labels (N,) int, paths [N],
    masked (N,) bool: whether the image's pixels are labelled (False for a defect without a mask),
    synthetic (N,) bool: a synthetic anomaly of the validation split (False for real images)."""

    maps: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    paths: list[str]
    masked: np.ndarray
    synthetic: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.synthetic is None:
            self.synthetic = np.zeros(len(self.labels), bool)

    @property
    def n_real_defects(self) -> int:
        """Labelled real defect images (not synthetic)."""
        return int(((self.labels == 1) & ~self.synthetic).sum())

    def real(self) -> Predictions:
        """Only the real images (normals and real defects; the synthetic anomalies left out)."""
        return self.subset(~self.synthetic)

    def synthetic_split(self) -> Predictions:
        """The held-out normals and their synthetic anomalies (the real defects left out)."""
        return self.subset(self.synthetic | (self.labels == 0))

    def subset(self, keep: np.ndarray) -> Predictions:
        """The images where ``keep`` (N,) is True."""
        return Predictions(
            self.maps[keep],
            self.scores[keep],
            self.masks[keep],
            self.labels[keep],
            [p for p, k in zip(self.paths, keep, strict=True) if k],
            self.masked[keep],
            self.synthetic[keep],
        )

    @property
    def n_unmasked(self) -> int:
        """Defect images labelled by image only (left out of pixel metrics)."""
        return int((~self.masked).sum())


def adps_maps(model: AdpsModel, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(image)
    return out.anomaly_map, out.image_score


@torch.no_grad()
def predict_dataset(
    model: AdpsModel,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    map_fn: MapFn = adps_maps,
) -> Predictions:
    """Anomaly maps and scores of every item of ``dataset`` (items: image, mask, label, path, masked)."""
    model.eval()
    maps, scores, masks, labels, paths, masked, synthetic = [], [], [], [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="predicting", leave=False, disable=not progress):
        anomaly_map, score = map_fn(model, batch["image"].to(device))
        maps.append(anomaly_map[:, 0].float().cpu().numpy())
        scores.append(score.float().cpu().numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        labels.append(batch["label"].numpy().astype(int))
        paths.extend(batch["path"])
        masked.append(batch["masked"].numpy().astype(bool))
        synthetic.append(batch["synthetic"].numpy().astype(bool))
    return Predictions(
        np.concatenate(maps),
        np.concatenate(scores),
        np.concatenate(masks),
        np.concatenate(labels),
        paths,
        np.concatenate(masked),
        np.concatenate(synthetic),
    )


def validation_predictions(
    model: AdpsModel,
    val: list,
    params: Params,
    device: torch.device,
    progress: bool = False,
    map_fn: MapFn = adps_maps,
) -> Predictions:
    """Maps and scores on the validation split: held-out normals + synthetic anomalies (own seed), and
    the real defects held out of test, if any."""
    normalize = input_normalizer(params)
    dataset = ValidationDataset(val, params.data.image_size, normalize, params.anomalies, params.runtime.seed + 2)
    return predict_dataset(model, dataset, params.evaluation.batch_size, device, progress, map_fn)
