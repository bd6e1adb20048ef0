"""Heatmap images: image | ground truth | anomaly map over the image | predicted mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adps.files import write_atomically


def colorize(anomaly_map: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) float RGB with the jet colormap."""
    from matplotlib import colormaps

    return colormaps["jet"](np.clip(anomaly_map, 0, 1))[..., :3]


def heatmap_panel(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, mask: np.ndarray | None) -> np.ndarray:
    """(H, 4W + gaps, 3) uint8 panel; the ground-truth tile is grey when no mask is known."""
    h, w = anomaly_map.shape
    gt = np.full((h, w, 3), 0.5) if mask is None else np.repeat(mask[..., None].astype(float), 3, axis=2)
    overlay = 0.5 * image + 0.5 * colorize(anomaly_map)
    predicted = image * 0.4 + np.array([1.0, 0.1, 0.1]) * 0.6 * (anomaly_map >= threshold)[..., None]
    gap = np.ones((h, 4, 3))
    tiles = [image, gap, gt, gap, overlay, gap, predicted]
    return (np.clip(np.concatenate(tiles, axis=1), 0, 1) * 255).astype(np.uint8)


def save_heatmap(path: Path, panel: np.ndarray, caption: str) -> Path:
    """Write the panel with a one-line caption under it (atomically)."""
    canvas = Image.new("RGB", (panel.shape[1], panel.shape[0] + 14), "white")
    canvas.paste(Image.fromarray(panel), (0, 0))
    ImageDraw.Draw(canvas).text((2, panel.shape[0] + 1), caption, fill="black")
    return write_atomically(path, lambda tmp: canvas.save(tmp, format="PNG"))
