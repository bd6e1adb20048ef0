"""torch Datasets: training (normal image + synthetic anomaly + mask) and test (image, mask, label)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from adps.config import AnomalyParams
from adps.data.anomalies import AnomalySynthesizer
from adps.data.images import InputGeometry, as_geometry, load_mask, read_rgb
from adps.data.layout import Sample
from adps.errors import DatasetError

Array = np.ndarray


SYNTHESIS_TRIES = 50  # Perlin masks drawn for one validation anomaly before giving up


class Normalizer:
    """Image (H, W, 3) in [0, 1] -> normalised tensor (3, H, W) with the teacher's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Array) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return (tensor - self.mean) / self.std


def pad_to(image: Array, size: int) -> Array:
    """An (H, W, ...) array mirrored out to at least ``size`` on each side (bottom and right)."""
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not (pad_h or pad_w):
        return image
    return np.pad(image, [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2), mode="symmetric")


def window(image: Array, size: int, rng: np.random.Generator) -> tuple[Array, tuple[int, int]]:
    """A random ``size`` x ``size`` window of an image at its own scale (padded when a side is shorter),
    and its top-left corner. An image of exactly that size is its own window (no random draw)."""
    if image.shape[:2] == (size, size):
        return image, (0, 0)
    image = pad_to(image, size)
    top, left = rng.integers(image.shape[0] - size + 1), rng.integers(image.shape[1] - size + 1)
    return image[top : top + size, left : left + size], (int(top), int(left))


class TrainDataset(Dataset):
    """Normal training images, each turned into a synthetic anomaly (or left normal) per epoch.

    Items: ``image`` (3, S, S) normalised, ``mask`` (1, S, S) in {0, 1}, ``label`` scalar, with S the
    model input size. An image larger than that at native resolution gives a random S x S window of
    itself each epoch (its pixels at their own scale). The window and the synthetic anomaly depend only
    on (seed, epoch, index), so runs are reproducible and a resumed run sees the same samples as an
    uninterrupted one.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int | InputGeometry,
        normalize: Normalizer,
        anomalies: AnomalyParams,
        seed: int,
    ):
        self.samples = list(samples)
        self.geometry = as_geometry(size)
        self.size = self.geometry.size
        self.seed = seed
        self.epoch = 0
        self.normalize = normalize
        self.synthesize = AnomalySynthesizer(anomalies, self.size, seed)
        self.cache: dict[int, Array] = {}  # 8-bit: a native image costs a quarter of its float size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self.cache:
            image = read_rgb(self.samples[index].image_path, self.geometry)[0]
            self.cache[index] = (image * 255).round().astype(np.uint8)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        crop, _ = window(self.cache[index], self.size, rng)
        image, mask = self.synthesize(crop.astype(np.float32) / 255.0, rng)
        return {
            "image": self.normalize(image),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": torch.tensor(float(mask.any())),
        }


class LabelledDataset(Dataset):
    """Test images with their ground truth: ``image`` (3, H, W) at the model input size, ``mask`` (1, H', W')
    at the mask's own stored size (the image's), ``label``, ``path``, ``masked``: False for a defect image
    without a mask (labelled by image only; its ``mask`` is all zeros), and ``synthetic`` (always False:
    these are real images)."""

    def __init__(self, samples: Sequence[Sample], size: int | InputGeometry, normalize: Normalizer):
        self.samples = list(samples)
        self.geometry = as_geometry(size)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index]
        image, original = read_rgb(sample.image_path, self.geometry)
        return {
            "image": self.normalize(image),
            "mask": torch.from_numpy(load_mask(sample.mask_path, original))[None],
            "label": torch.tensor(float(sample.label)),
            "path": str(sample.image_path),
            "masked": torch.tensor(sample.label == 0 or sample.mask_path is not None),
            "synthetic": torch.tensor(False),
        }


def paste(image: Array, crop: Array, crop_mask: Array, top: int, left: int) -> tuple[Array, Array]:
    """``crop`` (a window of ``image``, maybe padded past its edge) put back at (top, left), and the mask."""
    if crop.shape[:2] == image.shape[:2]:
        return crop, crop_mask
    height, width = min(crop.shape[0], image.shape[0] - top), min(crop.shape[1], image.shape[1] - left)
    out, mask = image.copy(), np.zeros(image.shape[:2], bool)
    out[top : top + height, left : left + width] = crop[:height, :width]
    mask[top : top + height, left : left + width] = crop_mask[:height, :width]
    return out, mask


def same_size_batches(dataset: Dataset, batch_size: int) -> Iterator[list[dict]]:
    """The dataset's items in order, in batches of up to ``batch_size`` whose images have one size."""
    batch: list[dict] = []
    for index in range(len(dataset)):
        item = dataset[index]
        if batch and (len(batch) == batch_size or batch[0]["image"].shape != item["image"].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def split_train_val(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of normal training images into (train, held-out validation); at least one each."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1])).permutation(len(samples))
    n_val = min(max(1, round(len(samples) * fraction)), len(samples) - 1)
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    return train, [s for i, s in enumerate(samples) if i in val_idx]


def split_held_out(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """The seeded ``fraction`` of each defect type's images (at least one of a type with two or more)."""
    held = []
    for defect_type in sorted({s.defect_type for s in samples if s.label == 1}):
        group = [s for s in samples if s.label == 1 and s.defect_type == defect_type]
        order = np.random.default_rng(np.random.SeedSequence([seed, 0x7A2, len(group)])).permutation(len(group))
        n_held = min(max(1, round(len(group) * fraction)), len(group) - 1)
        held += [group[i] for i in sorted(order[:n_held].tolist())]
    return held


class ValidationDataset(Dataset):
    """Held-out normal images, each twice: as is (label 0) and with a synthetic anomaly (label 1); then the
    real labelled defects held out of test, if any (label 1, their mask when they have one).

    The anomalies use their own seed, so thresholds chosen here never see the test split. Items carry
    ``synthetic``: True for the synthetic anomalies.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int | InputGeometry,
        normalize: Normalizer,
        anomalies: AnomalyParams,
        seed: int,
    ):
        self.real_defects = LabelledDataset([s for s in samples if s.label == 1], size, normalize)
        samples = [s for s in samples if s.label == 0]
        self.samples = list(samples)
        self.geometry = as_geometry(size)
        self.size = self.geometry.size
        self.seed = seed
        self.normalize = normalize
        always = anomalies.model_copy(update={"normal_prob": 0.0})
        self.synthesize = AnomalySynthesizer(always, self.size, seed)

    def __len__(self) -> int:
        return 2 * len(self.samples) + len(self.real_defects)

    def anomalous(self, image: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """A synthetic anomaly in a random model-input-sized window of ``image`` (the whole image when it has
        that size); a few empty Perlin masks are redrawn, endless ones are an error."""
        for _ in range(SYNTHESIS_TRIES):
            crop, (top, left) = window(image, self.size, rng)
            synthetic, crop_mask = self.synthesize(crop, rng)
            if crop_mask.any():
                return paste(image, synthetic, crop_mask, top, left)
        raise DatasetError(
            f"no synthetic anomaly in {SYNTHESIS_TRIES} draws: anomalies.perlin_threshold="
            f"{self.synthesize.cfg.perlin_threshold} leaves the Perlin masks empty; lower it (default 0.5)."
        )

    def __getitem__(self, index: int) -> dict[str, object]:
        if index >= 2 * len(self.samples):
            return self.real_defects[index - 2 * len(self.samples)]
        sample = self.samples[index % len(self.samples)]
        image = read_rgb(sample.image_path, self.geometry)[0]
        mask = np.zeros(image.shape[:2], bool)
        if index >= len(self.samples):
            image, mask = self.anomalous(image, np.random.default_rng(np.random.SeedSequence([self.seed, index])))
        return {
            "image": self.normalize(image),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": torch.tensor(float(mask.any())),
            "path": f"{sample.image_path}#{'synthetic' if mask.any() else 'normal'}",
            "masked": torch.tensor(True),
            "synthetic": torch.tensor(bool(mask.any())),
        }
