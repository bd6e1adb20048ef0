"""Training-anomaly synthesis, the DRAEM recipe that ADPS follows.

A Perlin-noise mask (scales 2^a x 2^b, random rotation, thresholded) cuts a region out of a
texture source, which is blended into the normal image:
``I_a = I * (1 - M) + (1 - beta) * A * M + beta * I * M`` with ``beta ~ U[0, beta_max)``.
Texture source: built-in procedural textures, or any folder of images (e.g. DTD).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from adps.config import AnomalyParams
from adps.data.images import load_rgb
from adps.data.layout import list_images
from adps.errors import DatasetError, ImageReadError

logger = logging.getLogger(__name__)
Array = np.ndarray


def fade(t: Array) -> Array:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> Array:
    """2-D Perlin noise of ``shape`` with ``res`` periods per axis (shape divisible by res), in ~[-1, 1]."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    cells = (shape[0] // res[0], shape[1] // res[1])
    coords = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def corner(dy: int, dx: int) -> Array:
        g = gradients[dy : dy + res[0], dx : dx + res[1]].repeat(cells[0], 0).repeat(cells[1], 1)
        offset = np.stack([coords[..., 0] - dy, coords[..., 1] - dx], axis=-1)
        return (offset * g).sum(axis=-1)

    t = fade(coords)
    top = corner(0, 0) * (1 - t[..., 1]) + corner(0, 1) * t[..., 1]
    bottom = corner(1, 0) * (1 - t[..., 1]) + corner(1, 1) * t[..., 1]
    return np.sqrt(2) * (top * (1 - t[..., 0]) + bottom * t[..., 0])


def perlin_mask(size: int, cfg: AnomalyParams, rng: np.random.Generator) -> Array:
    """Boolean (size, size) anomaly mask: rotated Perlin noise above ``cfg.perlin_threshold``."""
    exps = [e for e in range(cfg.perlin_scale_exp_max) if size % (2**e) == 0]
    res = (2 ** int(rng.choice(exps)), 2 ** int(rng.choice(exps)))
    noise = perlin_noise((size, size), res, rng)
    angle = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
    noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")
    return noise > cfg.perlin_threshold


def procedural_texture(size: int, rng: np.random.Generator) -> Array:
    """A random (size, size, 3) texture in [0, 1]: coloured noise, stripes, checks or speckles."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(4)
    if kind == 0:
        base = ndimage.gaussian_filter(rng.random((size, size)), rng.uniform(0.5, 4))
    elif kind == 1:
        theta, freq = rng.uniform(0, np.pi), rng.uniform(4, 24)
        base = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    elif kind == 2:
        freq = rng.uniform(3, 12)
        base = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(float)
    else:
        base = (rng.random((size, size)) > rng.uniform(0.7, 0.95)).astype(float)
        base = ndimage.gaussian_filter(base, 0.7)
    base = (base - base.min()) / (np.ptp(base) + 1e-8)
    low, high = rng.random(3), rng.random(3)
    return low + base[..., None] * (high - low)


class AnomalySynthesizer:
    """Turns a normal image into a (synthetic anomaly, mask) pair, reproducibly from a generator."""

    def __init__(self, cfg: AnomalyParams, image_size: int, seed: int):
        self.cfg = cfg
        self.size = image_size
        self.texture_paths: list[Path] = []
        self.textures: list[Array] = []
        if cfg.texture_dir is not None:
            self.texture_paths = list_images(Path(cfg.texture_dir))
            if not self.texture_paths:
                raise DatasetError(
                    f"anomalies.texture_dir has no images: {cfg.texture_dir}. "
                    "Point it at a folder of textures or set it to null for built-in ones."
                )
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD7D]))
            self.textures = [procedural_texture(image_size, rng) for _ in range(cfg.n_procedural_textures)]

    def texture(self, rng: np.random.Generator) -> Array:
        """A (size, size, 3) texture in [0, 1] from the configured source."""
        if not self.texture_paths:
            return self.textures[rng.integers(len(self.textures))]
        path = self.texture_paths[rng.integers(len(self.texture_paths))]
        try:
            return load_rgb(path, self.size)
        except ImageReadError as err:
            raise DatasetError(f"{err}. Remove or replace the texture file.") from err

    def __call__(self, image: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """Return ``(anomalous_image, mask)`` for an (H, W, 3) float image in [0, 1].

        With probability ``normal_prob`` the image is returned unchanged with an empty mask.
        """
        empty = np.zeros(image.shape[:2], bool)
        if rng.random() < self.cfg.normal_prob:
            return image, empty
        mask = perlin_mask(self.size, self.cfg, rng)
        if not mask.any():
            return image, empty
        beta = rng.uniform(0, self.cfg.beta_max)
        m = mask[..., None]
        anomalous = image * (1 - m) + (1 - beta) * self.texture(rng) * m + beta * image * m
        return anomalous.astype(image.dtype), mask
