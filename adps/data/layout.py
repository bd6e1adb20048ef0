"""The MVTec AD folder layout: the sample index, and importers of other layouts into it.

Layout of one category::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect>/<name>.png
    <category>/ground_truth/<defect>/<name>_mask.png
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from adps.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One image of a category, with where it sits in the layout."""

    category: str
    split: str  # "train" | "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" or the defect folder name
    image_path: Path
    mask_path: Path | None  # None when no mask file exists


def list_images(folder: Path) -> list[Path]:
    """Image files of one folder, sorted, ignoring hidden files and other suffixes."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def mask_path_for(category_dir: Path, defect_type: str, image_path: Path) -> Path:
    """Where the MVTec layout keeps the mask of ``image_path``."""
    return category_dir / "ground_truth" / defect_type / f"{image_path.stem}{MASK_SUFFIX}.png"


def build_sample_index(category_dir: Path, category: str) -> list[Sample]:
    """Index every image of one category in MVTec layout.

    Images in ``train/<x>`` with x != good are indexed as anomalous so that validation can reject
    them; masks are attached when the file exists, for good images too (validation rejects those).

    Raises:
        DatasetError: the category folder does not exist.
    """
    if not category_dir.is_dir():
        raise DatasetError(f"category folder not found: {category_dir}. Run `adps prepare` or check data.categories.")
    samples = []
    for split in ("train", "test"):
        split_dir = category_dir / split
        defect_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []
        for defect_dir in defect_dirs:
            for image_path in list_images(defect_dir):
                mask = mask_path_for(category_dir, defect_dir.name, image_path)
                samples.append(
                    Sample(
                        category=category,
                        split=split,
                        label=int(defect_dir.name != GOOD),
                        defect_type=defect_dir.name,
                        image_path=image_path,
                        mask_path=mask if mask.is_file() else None,
                    )
                )
    return samples


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), copying when linking is not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def import_mvtec_category(source_root: Path, category: str, dest: Path) -> None:
    """Bring one MVTec AD category (already in the target layout) into ``dest``."""
    src = source_root / category
    if not (src / "train" / GOOD).is_dir():
        raise DatasetError(f"MVTec category not found: {src}/train/good. Check data.import_path and data.categories.")
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            link_or_copy(path, dest / path.relative_to(src))


def save_binary_mask(mask: np.ndarray, path: Path) -> None:
    """Write a boolean mask as an 8-bit PNG with values 0 and 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def read_binary_mask(path: Path) -> np.ndarray:
    """Read a mask file as booleans (any non-zero pixel is anomalous)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 0


def import_kolektor(source_root: Path, dest: Path, defect_type: str = "defect") -> None:
    """Import KolektorSDD2 (``train/`` and ``test/`` with ``<id>.png`` + ``<id>_GT.png``).

    Images whose mask is empty are normal. Training keeps only normal images; test defects get
    their mask converted to a 0/255 PNG in ``ground_truth/<defect_type>/``.
    """
    for split in ("train", "test"):
        split_dir = source_root / split
        images = [p for p in list_images(split_dir) if not p.stem.endswith("_GT")]
        if not images:
            raise DatasetError(f"KolektorSDD2 split has no images: {split_dir}. Check data.import_path.")
        for image_path in images:
            gt_path = split_dir / f"{image_path.stem}_GT{image_path.suffix}"
            if not gt_path.is_file():
                raise DatasetError(f"KolektorSDD2 mask missing: {gt_path} (for {image_path}).")
            mask = read_binary_mask(gt_path)
            if not mask.any():
                link_or_copy(image_path, dest / split / GOOD / f"{image_path.stem}.png")
            elif split == "test":
                link_or_copy(image_path, dest / "test" / defect_type / f"{image_path.stem}.png")
                save_binary_mask(mask, mask_path_for(dest, defect_type, image_path))


def import_mask(src: Path, dst: Path) -> None:
    """Write a mask as a 0/255 PNG; one that does not decode is copied as is for validation to name."""
    try:
        mask = read_binary_mask(src)
    except (OSError, ValueError) as err:
        logger.warning("mask %s does not decode (%s): left for validation to report", src, err)
        link_new(src, dst)
        return
    save_binary_mask(mask, dst)


def normal_split(name: str, seed: int, test_fraction: float) -> str:
    """``test`` or ``train`` for a normal image, decided by its name alone (seeded hash).

    An image keeps its split when others are added or removed, so new images arriving in a source
    folder change only what they add, never where the existing ones sit.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def link_new(src: Path, dst: Path) -> None:
    """:func:`link_or_copy` that refuses to replace a file already imported under the same name."""
    if dst.exists():
        raise DatasetError(f"{src} would replace {dst}, imported from elsewhere: rename one of them.")
    link_or_copy(src, dst)


def import_folder_category(
    normal_dir: Path,
    anomalous_dir: Path,
    mask_dir: Path,
    dest: Path,
    *,
    mask_suffix: str,
    test_normal_fraction: float,
    seed: int,
    require_normals: bool = True,
) -> None:
    """Import a generic (normal, anomalous, masks) folder set into the MVTec layout.

    A seeded, per-name share of the normal images goes to ``test/good`` (:func:`normal_split`);
    anomalous images go to ``test/anomalous`` with their mask (``masks/<stem><mask_suffix>.<ext>``)
    when it exists. A missing mask is left for validation to report by name. With
    ``require_normals=False`` (images added on top of another source) the folders may be empty or absent.
    """
    normals = list_images(normal_dir)
    if not normals and require_normals:
        raise DatasetError(f"no normal images in {normal_dir}. Check data.import_path and data.folder.normal.")
    for image_path in normals:
        split = normal_split(image_path.name, seed, test_normal_fraction)
        link_new(image_path, dest / split / GOOD / image_path.name)
    masks_by_stem = {m.stem: m for m in list_images(mask_dir)}
    for image_path in list_images(anomalous_dir):
        link_new(image_path, dest / "test" / "anomalous" / image_path.name)
        mask = masks_by_stem.get(f"{image_path.stem}{mask_suffix}")
        if mask is not None:
            import_mask(mask, mask_path_for(dest, "anomalous", image_path))
        else:
            logger.warning("no mask for %s in %s", image_path, mask_dir)
