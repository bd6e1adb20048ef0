"""The embedded synthetic dataset: MVTec-layout categories generated from the seed.

Two texture-like categories (``fabric``, ``wood``) and two object-like ones (``washer``, a round
machined part with a key notch, and ``capsule``), all ``synthetic.image_size`` squares; and ``strip``,
a long strip of ground steel (``synthetic.strip_height`` x ``strip_width``, a KolektorSDD2-like aspect)
several times the model input, whose defects keep their physical size whatever the image size
(scratches 1-3 px wide, pits of a few px). Normal images vary in lighting, position,
rotation and sensor noise. Test defects (scratch, crack, hole, stain, contamination) are painted
with their own geometric recipes and pixel-exact masks; they share nothing with the Perlin/texture
recipe used to synthesise training anomalies, so evaluation is not circular.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from adps.config import SyntheticParams
from adps.data.layout import GOOD, save_binary_mask

Array = np.ndarray
MIN_DEFECT_AREA = 0.001  # smallest defect, as a fraction of the image area (16 px at 128 x 128)
STRIP = "strip"  # the high-resolution, non-square category
STRIP_MIN_DEFECT_PIXELS = 6


@dataclass(frozen=True)
class Pose:
    """Per-image variation of a normal image."""

    dx: float
    dy: float
    angle: float  # radians
    gain: float
    gradient: tuple[float, float]


def image_rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    """An independent, order-free random stream for one generated image."""
    words = [
        seed,
        zlib.crc32(category.encode()),
        zlib.crc32(split.encode()),
        zlib.crc32(kind.encode()),
        index,
    ]
    return np.random.default_rng(np.random.SeedSequence(words))


def sample_pose(rng: np.random.Generator, cfg: SyntheticParams) -> Pose:
    return Pose(
        dx=rng.uniform(-cfg.max_shift, cfg.max_shift),
        dy=rng.uniform(-cfg.max_shift, cfg.max_shift),
        angle=np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)),
        gain=1.0 + rng.uniform(-cfg.lighting_jitter, cfg.lighting_jitter),
        gradient=(rng.uniform(-0.5, 0.5) * cfg.lighting_jitter, rng.uniform(-0.5, 0.5) * cfg.lighting_jitter),
    )


def grid(size: int, pose: Pose, center: float | None = None) -> tuple[Array, Array]:
    """Pixel coordinates in the object frame: shifted by (dx, dy), rotated by ``pose.angle``."""
    c = (size - 1) / 2 if center is None else center
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = xx - c - pose.dx, yy - c - pose.dy
    cos, sin = np.cos(pose.angle), np.sin(pose.angle)
    return cos * x + sin * y, -sin * x + cos * y


def shape_of(size: int | tuple[int, int]) -> tuple[int, int]:
    """(H, W) of a square side or of an (H, W) shape."""
    return (size, size) if isinstance(size, int) else tuple(size)


def smooth_noise(rng: np.random.Generator, size: int | tuple[int, int], sigma: float | tuple[float, float]) -> Array:
    """Gaussian-smoothed white noise with unit standard deviation (``size``: a square side or (H, W))."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape_of(size)), sigma, mode="wrap")
    return noise / (noise.std() + 1e-8)


def soft_inside(signed_dist: Array) -> Array:
    """Anti-aliased inside indicator from a signed distance (negative inside), in [0, 1]."""
    return np.clip(0.5 - signed_dist, 0.0, 1.0)


# --- normal renderers: (rng, size, pose) -> (H, W, 3) float image and the defect-placement region


def render_fabric(rng: np.random.Generator, size: int, pose: Pose) -> tuple[Array, Array]:
    x, y = grid(size, pose)
    period = size / 16 * (1 + rng.uniform(-0.02, 0.02))
    u, v = x / period + rng.uniform(0, 2), y / period + rng.uniform(0, 2)
    weft = np.sin(np.pi * v) ** 2 * (0.75 + 0.25 * np.sin(np.pi * u) ** 2)
    warp = np.sin(np.pi * u) ** 2 * (0.75 + 0.25 * np.sin(np.pi * v) ** 2)
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    weave = np.where(over, weft, warp)
    fibres = 0.06 * smooth_noise(rng, size, 0.7) + 0.04 * smooth_noise(rng, size, 10)
    intensity = 0.35 + 0.45 * weave + fibres
    tint = np.array([0.55, 0.62, 0.85])
    return intensity[..., None] * tint, np.ones((size, size), bool)


def render_wood(rng: np.random.Generator, size: int, pose: Pose) -> tuple[Array, Array]:
    _, y = grid(size, pose)
    turbulence = smooth_noise(rng, size, size / 10)
    rings = np.sin(2 * np.pi * (y / (size / 9) + 0.35 * turbulence + rng.uniform(0, 1)))
    streaks = ndimage.gaussian_filter(rng.standard_normal((size, size)), (0.6, size / 16))
    streaks /= streaks.std() + 1e-8
    intensity = 0.58 + 0.12 * rings + 0.04 * streaks + 0.03 * smooth_noise(rng, size, size / 6)
    tint = np.array([1.0, 0.72, 0.45])
    return intensity[..., None] * tint, np.ones((size, size), bool)


def render_washer(rng: np.random.Generator, size: int, pose: Pose) -> tuple[Array, Array]:
    x, y = grid(size, pose)
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    outer, inner = 0.40 * size, 0.15 * size
    notch = (np.abs(y) < 0.035 * size) & (x > 0) & (r < inner + 0.06 * size)
    body = soft_inside(r - outer) * soft_inside(inner - r) * (~notch)
    sheen = 0.58 + 0.10 * np.cos(2 * (theta - 0.6)) + 0.025 * np.sin(2 * np.pi * r / 2.3)
    chamfer = np.exp(-(((outer - r) / (0.025 * size)) ** 2)) * 0.12
    metal = sheen - chamfer + 0.015 * smooth_noise(rng, size, 1.0)
    background = 0.16 + 0.02 * smooth_noise(rng, size, size / 4)
    image = body * metal + (1 - body) * background
    region = ndimage.binary_erosion(body > 0.5, iterations=max(2, size // 40))
    return image[..., None] * np.array([0.95, 0.97, 1.0]), region


def render_capsule(rng: np.random.Generator, size: int, pose: Pose) -> tuple[Array, Array]:
    u, v = grid(size, pose)
    half, radius = 0.30 * size, 0.14 * size
    dist = np.hypot(np.clip(np.abs(u) - half, 0, None), v) - radius
    body = soft_inside(dist)
    shade = 1 - 0.35 * np.clip(v / radius, -1, 1) ** 2
    highlight = 0.22 * np.exp(-(((v + 0.45 * radius) / (0.14 * radius)) ** 2))
    colour = np.where((u < 0)[..., None], np.array([0.78, 0.22, 0.18]), np.array([0.92, 0.86, 0.62]))
    seam = 1 - 0.25 * np.exp(-((u / 0.8) ** 2))
    shell = colour * (shade * seam)[..., None] + highlight[..., None]
    background = 0.86 + 0.015 * smooth_noise(rng, size, size / 4)
    image = body[..., None] * shell + (1 - body[..., None]) * background[..., None]
    region = ndimage.binary_erosion(body > 0.5, iterations=max(2, size // 32))
    return image, region


def render_strip(rng: np.random.Generator, shape: tuple[int, int], pose: Pose) -> tuple[Array, Array]:
    """Ground steel: fine grinding marks across the strip, grain, and a slow sheen along it."""
    height, width = shape
    marks = ndimage.gaussian_filter(rng.standard_normal(shape), (0.5, width / 6), mode="wrap")
    marks /= marks.std() + 1e-8
    along = np.sin(2 * np.pi * (np.arange(height)[:, None] + pose.dy * 10) / (height * rng.uniform(0.8, 1.2)))
    intensity = 0.52 + 0.035 * marks + 0.02 * smooth_noise(rng, shape, 1.0) + 0.03 * along
    return intensity[..., None] * np.array([0.92, 0.95, 1.0]), np.ones(shape, bool)


RENDERERS: dict[str, Callable[[np.random.Generator, int, Pose], tuple[Array, Array]]] = {
    "fabric": render_fabric,
    "wood": render_wood,
    "washer": render_washer,
    "capsule": render_capsule,
}


# --- defects: (image, region, rng) -> (image, mask); the mask is exactly the changed pixels


def pick_point(region: Array, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    """A random (row, col) inside ``region`` and at least ``margin`` pixels from the border."""
    inner = region.copy()
    inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
    rows, cols = np.nonzero(inner)
    k = rng.integers(len(rows))
    return int(rows[k]), int(cols[k])


def stroke(size: int | tuple[int, int], points: Array, width: float) -> Array:
    """Boolean mask of a polyline given by dense (row, col) points, ``width`` pixels wide."""
    height, width_px = shape_of(size)
    canvas = np.zeros((height, width_px), bool)
    rr = np.clip(np.round(points[:, 0]).astype(int), 0, height - 1)
    cc = np.clip(np.round(points[:, 1]).astype(int), 0, width_px - 1)
    canvas[rr, cc] = True
    return ndimage.distance_transform_edt(~canvas) <= width / 2


def curve_points(start: tuple[int, int], length: float, rng: np.random.Generator, wiggle: float) -> Array:
    """Dense points of a random smooth curve of about ``length`` pixels."""
    steps = int(length * 3)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, wiggle, steps))
    step = np.stack([np.sin(heading), np.cos(heading)], axis=1) / 3
    return np.asarray(start, float) + np.cumsum(step, axis=0)


def blob(size: int | tuple[int, int], center: tuple[int, int], radius: float, rng: np.random.Generator) -> Array:
    """An irregular filled blob around ``center``."""
    height, width = shape_of(size)
    yy, xx = np.mgrid[0:height, 0:width]
    dist = np.hypot(yy - center[0], xx - center[1]) / radius
    return dist + 0.35 * smooth_noise(rng, size, max(radius / 2, 1.0)) < 1.0


def paint(image: Array, mask: Array, colour: Array, alpha: float) -> Array:
    out = image.copy()
    out[mask] = (1 - alpha) * image[mask] + alpha * colour
    return out


def defect_scratch(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    size = image.shape[0]
    points = curve_points(pick_point(region, rng, size // 8), rng.uniform(0.15, 0.3) * size, rng, 0.02)
    mask = stroke(size, points, rng.uniform(1.0, 2.0)) & region
    return paint(image, mask, image[mask] * 0 + rng.uniform(0.75, 0.95), rng.uniform(0.45, 0.7)), mask


def defect_crack(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    size = image.shape[0]
    start = pick_point(region, rng, size // 8)
    trunk = curve_points(start, rng.uniform(0.15, 0.28) * size, rng, 0.25)
    branch = curve_points(tuple(trunk[len(trunk) // 2].astype(int)), 0.08 * size, rng, 0.3)
    mask = (stroke(size, trunk, 1.2) | stroke(size, branch, 1.0)) & region
    return paint(image, mask, image[mask] * 0.45, 1.0), mask


def defect_hole(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    size = image.shape[0]
    center = pick_point(region, rng, size // 8)
    radius = rng.uniform(0.025, 0.05) * size
    mask = blob(size, center, radius, rng) & region
    yy, xx = np.nonzero(mask)
    depth = np.hypot(yy - center[0], xx - center[1]) / radius
    colour = (0.10 + 0.15 * np.clip(depth, 0, 1))[:, None] * np.ones(3)
    return paint(image, mask, colour, 0.9), mask


def defect_stain(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    size = image.shape[0]
    mask = blob(size, pick_point(region, rng, size // 8), rng.uniform(0.05, 0.1) * size, rng) & region
    tint = np.array([0.75, 0.65, 0.35]) * rng.uniform(0.6, 1.0)
    return paint(image, mask, image[mask] * tint, rng.uniform(0.35, 0.6)), mask


def defect_contamination(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    size = image.shape[0]
    center = np.asarray(pick_point(region, rng, size // 6))
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(2, 6)):
        offset = rng.normal(0, 0.04 * size, 2)
        mask |= blob(size, tuple((center + offset).astype(int)), rng.uniform(0.008, 0.02) * size + 0.8, rng)
    if rng.random() < 0.5:
        mask |= stroke(size, curve_points(tuple(center), 0.12 * size, rng, 0.15), 1.0)
    mask &= region
    colour = rng.choice([np.array([0.08, 0.08, 0.1]), np.array([0.15, 0.3, 0.65]), np.array([0.95, 0.95, 0.9])])
    return paint(image, mask, colour, 0.85), mask


DEFECTS: dict[str, Callable[[Array, Array, np.random.Generator], tuple[Array, Array]]] = {
    "scratch": defect_scratch,
    "crack": defect_crack,
    "hole": defect_hole,
    "stain": defect_stain,
    "contamination": defect_contamination,
}


# Defects of the strip: sizes in pixels, not in fractions of the image (a scratch is as wide on a large image)


def within(points: Array, shape: tuple[int, int]) -> Array:
    """The (row, col) points that fall inside an image of ``shape`` (a curve leaving the image ends there)."""
    inside = (points >= 0).all(axis=1) & (points[:, 0] <= shape[0] - 1) & (points[:, 1] <= shape[1] - 1)
    return points[inside]


def strip_scratch(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    points = within(curve_points(pick_point(region, rng, 24), rng.uniform(30, 100), rng, 0.02), image.shape[:2])
    mask = stroke(image.shape[:2], points, rng.uniform(1.0, 3.0)) & region
    return paint(image, mask, image[mask] * 0 + rng.uniform(0.8, 0.95), rng.uniform(0.45, 0.7)), mask


def strip_crack(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    trunk = within(curve_points(pick_point(region, rng, 24), rng.uniform(25, 70), rng, 0.25), image.shape[:2])
    branch = within(curve_points(tuple(trunk[len(trunk) // 2].astype(int)), 15, rng, 0.3), image.shape[:2])
    mask = (stroke(image.shape[:2], trunk, 1.2) | stroke(image.shape[:2], branch, 1.0)) & region
    return paint(image, mask, image[mask] * 0.45, 1.0), mask


def strip_hole(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    center, radius = pick_point(region, rng, 16), rng.uniform(2.0, 5.0)
    mask = blob(image.shape[:2], center, radius, rng) & region
    yy, xx = np.nonzero(mask)
    depth = np.hypot(yy - center[0], xx - center[1]) / radius
    return paint(image, mask, (0.10 + 0.15 * np.clip(depth, 0, 1))[:, None] * np.ones(3), 0.9), mask


def strip_stain(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    mask = blob(image.shape[:2], pick_point(region, rng, 24), rng.uniform(6.0, 16.0), rng) & region
    tint = np.array([0.75, 0.65, 0.35]) * rng.uniform(0.6, 1.0)
    return paint(image, mask, image[mask] * tint, rng.uniform(0.35, 0.6)), mask


def strip_contamination(image: Array, region: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    center = np.asarray(pick_point(region, rng, 24))
    mask = np.zeros(image.shape[:2], bool)
    for _ in range(rng.integers(2, 6)):
        spot = tuple((center + rng.normal(0, 5.0, 2)).astype(int))
        mask |= blob(image.shape[:2], spot, rng.uniform(1.0, 2.5) + 0.8, rng)
    mask &= region
    colour = rng.choice([np.array([0.08, 0.08, 0.1]), np.array([0.15, 0.3, 0.65]), np.array([0.95, 0.95, 0.9])])
    return paint(image, mask, colour, 0.85), mask


STRIP_DEFECTS: dict[str, Callable[[Array, Array, np.random.Generator], tuple[Array, Array]]] = {
    "scratch": strip_scratch,
    "crack": strip_crack,
    "hole": strip_hole,
    "stain": strip_stain,
    "contamination": strip_contamination,
}


def finish(image: Array, pose: Pose, rng: np.random.Generator, noise_std: float) -> Array:
    """Apply lighting (gain and gradient) and sensor noise, then quantise to 8 bits."""
    height, width = image.shape[:2]
    rows, cols = np.linspace(-1, 1, height), np.linspace(-1, 1, width)
    light = pose.gain + pose.gradient[0] * rows[:, None] + pose.gradient[1] * cols[None, :]
    noisy = image * light[..., None] + rng.normal(0, noise_std, image.shape)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate_image(
    category: str, cfg: SyntheticParams, rng: np.random.Generator, defect: str | None
) -> tuple[Array, Array]:
    """One (H, W, 3) uint8 image and its (H, W) boolean defect mask (empty when normal)."""
    pose = sample_pose(rng, cfg)
    if category == STRIP:
        image, region = render_strip(rng, (cfg.strip_height, cfg.strip_width), pose)
        defects, min_pixels = STRIP_DEFECTS, STRIP_MIN_DEFECT_PIXELS
    else:
        image, region = RENDERERS[category](rng, cfg.image_size, pose)
        defects, min_pixels = DEFECTS, max(8, round(MIN_DEFECT_AREA * cfg.image_size**2))
    mask = np.zeros(region.shape, bool)
    if defect is not None:
        while mask.sum() < min_pixels:  # a defect clipped away by the part's outline is drawn again
            painted, mask = defects[defect](image, region, rng)
        image = painted
    return finish(image, pose, rng, cfg.noise_std), mask


def generate_category(category: str, cfg: SyntheticParams, seed: int, dest: Path, progress: bool = False) -> int:
    """Write one category in MVTec layout under ``dest``; returns the number of images."""
    jobs = [("train", GOOD, i) for i in range(cfg.n_train)]
    jobs += [("test", GOOD, i) for i in range(cfg.n_test_good)]
    jobs += [("test", kind, i) for kind in cfg.defect_kinds for i in range(cfg.n_test_defect)]
    for split, kind, index in tqdm(jobs, desc=f"generating {category}", unit="img", disable=not progress):
        rng = image_rng(seed, category, split, kind, index)
        image, mask = generate_image(category, cfg, rng, None if kind == GOOD else kind)
        image_path = dest / split / kind / f"{index:03d}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="RGB").save(image_path)
        if kind != GOOD:
            save_binary_mask(mask, dest / "ground_truth" / kind / f"{index:03d}_mask.png")
    return len(jobs)


def write_new_images(
    category: str, cfg: SyntheticParams, dest: Path, good: int, defects: int, seed: int, prefix: str
) -> list[Path]:
    """New images of a category in the folder layout a source delivers (``normal/``, ``anomalous/``, ``masks/``).

    What a production line adds overnight, for demos and tests of the nightly run: ``good`` normal
    images and ``defects`` labelled defects (kinds in turn) with masks, drawn from their own seed.
    """
    written = []
    for index in range(good + defects):
        kind = GOOD if index < good else cfg.defect_kinds[(index - good) % len(cfg.defect_kinds)]
        image, mask = generate_image(
            category, cfg, image_rng(seed, category, "new", kind, index), None if kind == GOOD else kind
        )
        folder, name = ("normal" if kind == GOOD else "anomalous"), f"{prefix}{index:03d}.png"
        path = dest / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="RGB").save(path)
        if kind != GOOD:
            save_binary_mask(mask, dest / "masks" / f"{prefix}{index:03d}_mask.png")
        written.append(path)
    return written
