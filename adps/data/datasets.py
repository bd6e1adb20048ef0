"""torch Datasets: training (normal image + synthetic anomaly + mask) and test (image, mask, label)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adps.config import Params
from adps.data.layout import Sample
from adps.data.synthesis import AnomalySynthesizer
from adps.errors import DatasetError, ImageReadError
from adps.model.backbones import input_normalization

Array = np.ndarray


SYNTHESIS_TRIES = 50  # Perlin masks drawn for one validation anomaly before giving up
MAX_IMAGE_PIXELS = 64_000_000  # larger files are refused before decoding (a decompression bomb costs GBs)
MIN_IMAGE_SIDE = 16  # smaller images carry no texture to score; resizing them up only invents pixels


def load_rgb(path: Path | IO[bytes], size: int, name: str | None = None) -> Array:
    """Read an image as (size, size, 3) float32 RGB in [0, 1] (bilinear resize); see :func:`read_rgb`."""
    return read_rgb(path, size, name)[0]


def read_rgb(source: Path | IO[bytes], size: int, name: str | None = None) -> tuple[Array, tuple[int, int]]:
    """An image file (or its bytes) as (size, size, 3) float32 RGB in [0, 1], and its original (width, height).

    8-bit images map 0..255 to [0, 1]; 16-bit ones 0..65535; float images are taken as [0, 1] when
    every value lies there (else as 0..255, or 0..65535 above 255). ``name`` labels errors for bytes.

    Raises:
        ImageReadError: the file is missing, truncated, not an image, too large or too small.
    """
    try:
        with Image.open(source) as img:
            check_image_size(img.size)
            img.load()
            original = img.size
            if img.mode.startswith("I") or img.mode == "F":
                img = Image.fromarray(to_8bit(np.asarray(img, dtype=np.float64), img.mode))
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.float32) / 255.0, original
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {name or source}: {err}") from err


def check_image_size(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{width}x{height} px is over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; downscale it first"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"{width}x{height} px is smaller than {MIN_IMAGE_SIDE} px on a side")


def to_8bit(values: Array, mode: str) -> Array:
    """A 16-bit or float image as uint8 0..255 (see :func:`load_rgb` for the value ranges)."""
    if not np.isfinite(values).all():
        raise ValueError("the image has NaN or infinite pixel values")
    top = float(values.max(initial=0.0))
    if mode == "F" and top <= 1.0 and values.min(initial=0.0) >= 0.0:
        scale = 255.0
    elif mode == "F" and top <= 255.0:
        scale = 1.0
    else:
        scale = 1 / 257.0
    return (values * scale).round().clip(0, 255).astype(np.uint8)


def load_mask(path: Path | None, size: int) -> Array:
    """Read a mask as (size, size) float32 in {0, 1} (nearest resize); zeros when ``path`` is None."""
    if path is None:
        return np.zeros((size, size), np.float32)
    try:
        with Image.open(path) as img:
            img = img.convert("L").resize((size, size), Image.NEAREST)
            return (np.asarray(img) > 0).astype(np.float32)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read mask {path}: {err}") from err


class Normalizer:
    """Image (H, W, 3) in [0, 1] -> normalised tensor (3, H, W) with the teacher's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Array) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return (tensor - self.mean) / self.std


class TrainDataset(Dataset):
    """Normal training images, each turned into a synthetic anomaly (or left normal) per epoch.

    Items: ``image`` (3, H, W) normalised, ``mask`` (1, H, W) in {0, 1}, ``label`` scalar.
    The synthetic anomaly depends only on (seed, epoch, index), so runs are reproducible and
    a resumed run sees the same samples as an uninterrupted one.
    """

    def __init__(self, samples: Sequence[Sample], params: Params, seed: int):
        self.samples = list(samples)
        self.size = params.data.image_size
        self.seed = seed
        self.epoch = 0
        self.normalize = Normalizer(*input_normalization(params))
        self.synthesize = AnomalySynthesizer(params.synthesis, self.size, seed)
        self.cache: dict[int, Array] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self.cache:
            self.cache[index] = load_rgb(self.samples[index].image_path, self.size)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        image, mask = self.synthesize(self.cache[index], rng)
        return {
            "image": self.normalize(image),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": torch.tensor(float(mask.any())),
        }


class LabelledDataset(Dataset):
    """Test images with their ground truth: ``image``, ``mask`` (1, H, W), ``label``, ``path``."""

    def __init__(self, samples: Sequence[Sample], params: Params):
        self.samples = list(samples)
        self.size = params.data.image_size
        self.normalize = Normalizer(*input_normalization(params))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index]
        return {
            "image": self.normalize(load_rgb(sample.image_path, self.size)),
            "mask": torch.from_numpy(load_mask(sample.mask_path, self.size))[None],
            "label": torch.tensor(float(sample.label)),
            "path": str(sample.image_path),
        }


def split_train_val(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of normal training images into (train, held-out validation); at least one each."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1])).permutation(len(samples))
    n_val = min(max(1, round(len(samples) * fraction)), len(samples) - 1)
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    return train, [s for i, s in enumerate(samples) if i in val_idx]


class ValidationDataset(Dataset):
    """Held-out normal images, each twice: as is (label 0) and with a synthetic anomaly (label 1).

    The anomalies use their own seed, so thresholds chosen here never see the test split.
    """

    def __init__(self, samples: Sequence[Sample], params: Params, seed: int):
        self.samples = list(samples)
        self.size = params.data.image_size
        self.seed = seed
        self.normalize = Normalizer(*input_normalization(params))
        always = params.synthesis.model_copy(update={"normal_prob": 0.0})
        self.synthesize = AnomalySynthesizer(always, self.size, seed)

    def __len__(self) -> int:
        return 2 * len(self.samples)

    def anomalous(self, image: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """A synthetic anomaly on ``image``; a few empty Perlin masks are redrawn, endless ones are an error."""
        for _ in range(SYNTHESIS_TRIES):
            synthetic, mask = self.synthesize(image, rng)
            if mask.any():
                return synthetic, mask
        raise DatasetError(
            f"no synthetic anomaly in {SYNTHESIS_TRIES} draws: synthesis.perlin_threshold="
            f"{self.synthesize.cfg.perlin_threshold} leaves the Perlin masks empty; lower it (default 0.5)."
        )

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index % len(self.samples)]
        image = load_rgb(sample.image_path, self.size)
        mask = np.zeros(image.shape[:2], bool)
        if index >= len(self.samples):
            image, mask = self.anomalous(image, np.random.default_rng(np.random.SeedSequence([self.seed, index])))
        return {
            "image": self.normalize(image),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": torch.tensor(float(mask.any())),
            "path": f"{sample.image_path}#{'synthetic' if mask.any() else 'normal'}",
        }
