"""Running a model over a dataset and collecting maps, scores and ground truth as numpy arrays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from adps.config import Params
from adps.data.datasets import ValidationDataset, same_size_batches
from adps.errors import DatasetError
from adps.evaluation.metrics import flat
from adps.model.network import AdpsModel, at_size
from adps.training.checkpoints import input_normalizer, params_geometry

MapFn = Callable[[AdpsModel, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Predictions:
    """maps [N x (H_i, W_i)] float32 at each mask's own size, scores (N,), masks [N x (H_i, W_i)] bool,
    labels (N,) int, paths [N], masked (N,) bool: whether the image's pixels are labelled (False for a
    defect without a mask), synthetic (N,) bool: a synthetic anomaly of the validation split (False for
    real images). Images keep their own sizes, so maps and masks are lists (an (N, H, W) array also works)."""

    maps: list[np.ndarray]
    scores: np.ndarray
    masks: list[np.ndarray]
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
            [m for m, k in zip(self.maps, keep, strict=True) if k],
            self.scores[keep],
            [m for m, k in zip(self.masks, keep, strict=True) if k],
            self.labels[keep],
            [p for p, k in zip(self.paths, keep, strict=True) if k],
            self.masked[keep],
            self.synthetic[keep],
        )

    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(map values, mask labels) of every pixel of the images with masks, flattened in image order."""
        keep = [i for i, k in enumerate(self.masked) if k]
        return flat([self.maps[i] for i in keep]), flat([self.masks[i] for i in keep], bool)

    def all_finite(self) -> bool:
        return bool(np.isfinite(self.scores).all() and all(np.isfinite(m).all() for m in self.maps))

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
    """Anomaly maps and scores of every item of ``dataset`` (items: image, mask, label, path, masked,
    synthetic); each map is brought to its mask's size, so pixel metrics stand on the ground truth as stored."""
    model.eval()
    maps, scores, items = [], [], []
    batches = same_size_batches(dataset, batch_size)
    for batch in tqdm(batches, desc="predicting", leave=False, disable=not progress):
        if problem := model.scorer.input_problem(*batch[0]["image"].shape[-2:]):
            raise DatasetError(f"cannot score {batch[0]['path']}: {problem}")
        anomaly_map, score = map_fn(model, torch.stack([item["image"] for item in batch]).to(device))
        for item, one_map in zip(batch, anomaly_map[:, 0].float().cpu(), strict=True):
            maps.append(at_size(one_map, item["mask"].shape[-2:]).numpy())
        scores.append(score.float().cpu().numpy())
        items += [{k: v for k, v in item.items() if k != "image"} for item in batch]
    return labelled_predictions(maps, np.concatenate(scores), items)


def labelled_predictions(maps: list[np.ndarray], scores: np.ndarray, items: list[dict]) -> Predictions:
    """Predictions from maps (each at its mask's size), scores (N,) and the dataset items they answer (the
    ground truth: mask, label, path, masked, synthetic)."""
    return Predictions(
        maps,
        scores,
        [item["mask"][0].numpy() > 0.5 for item in items],
        np.array([int(item["label"]) for item in items]),
        [item["path"] for item in items],
        np.array([bool(item["masked"]) for item in items]),
        np.array([bool(item["synthetic"]) for item in items]),
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
    geometry = params_geometry(params)
    dataset = ValidationDataset(val, geometry, normalize, params.anomalies, params.runtime.seed + 2)
    return predict_dataset(model, dataset, params.evaluation.batch_size, device, progress, map_fn)
