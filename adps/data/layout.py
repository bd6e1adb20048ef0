"""The MVTec AD folder layout: the sample index, and importers of other layouts into it.

Layout of one category::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect>/<name>.png
    <category>/ground_truth/<defect>/<name>_mask.png
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from adps.data.images import read_mask
from adps.errors import DatasetError, ImageReadError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
GOOD = "good"
MASK_SUFFIX = "_mask"
NOT_IMPORTED = "not_imported.csv"  # in a category folder: the source files its import left out, and why


@dataclass(frozen=True)
class Sample:
    """One image of a category, with where it sits in the layout."""

    category: str
    split: str  # "train" | "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" or the defect folder name
    image_path: Path
    mask_path: Path | None  # None when no mask file exists


@dataclass(frozen=True)
class Skipped:
    """A source file an importer did not take, and why.

    ``blocking``: a likely mistake (a mask that pairs no image, an image format not imported, a
    subfolder): validation fails on it. Otherwise a documented exclusion (KolektorSDD2's training
    defects, non-image files, the empty mask of a normal image): named, and the category goes on.
    """

    source: Path
    reason: str
    blocking: bool


def write_not_imported(dest: Path, skipped: list[Skipped], recorded: Callable[[Path], str]) -> None:
    """``dest/not_imported.csv``: one row per file left out (``file, reason, blocking``); none when nothing was."""
    if not skipped:
        return
    rows = sorted((recorded(entry.source), entry.reason, str(entry.blocking).lower()) for entry in skipped)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([("file", "reason", "blocking"), *rows])
    (dest / NOT_IMPORTED).write_text(buffer.getvalue())


def read_not_imported(category_dir: Path) -> list[dict[str, str]]:
    """The rows of a category's ``not_imported.csv`` (empty when its import left nothing out)."""
    path = category_dir / NOT_IMPORTED
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def list_images(folder: Path) -> list[Path]:
    """Image files of one folder, sorted, ignoring hidden files and other suffixes."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def usable(paths: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """Source files that can be taken, and the broken links among them (named, blocking)."""
    broken = [p for p in paths if not p.exists()]
    reason = "a link to a file that does not exist"
    return [p for p in paths if p.exists()], [Skipped(p, reason, True) for p in broken]


def left_out(folder: Path, taken: list[Path]) -> list[Skipped]:
    """Everything in ``folder`` (hidden names aside) that is not among ``taken``, with why."""
    if not folder.is_dir():
        return []
    chosen = set(taken)
    return [
        skipped_entry(path) for path in sorted(folder.iterdir()) if path not in chosen and not path.name.startswith(".")
    ]


def skipped_entry(path: Path) -> Skipped:
    """Why a file or folder next to the imported images was not taken."""
    if path.is_dir():
        return Skipped(path, "a subfolder is not read: put its images directly in the folder", True)
    if path.suffix.lower() in Image.registered_extensions():
        formats = ", ".join(sorted(IMAGE_SUFFIXES))
        return Skipped(path, f"image format {path.suffix} is not imported (use one of {formats})", True)
    return Skipped(path, "not an image file", False)


def mask_candidates(category_dir: Path, defect_type: str, image_path: Path) -> list[Path]:
    """Mask files of ``image_path`` in the MVTec layout: ``ground_truth/<defect>/<stem>_mask.<image suffix>``."""
    folder = category_dir / "ground_truth" / defect_type
    return [m for m in list_images(folder) if m.stem == f"{image_path.stem}{MASK_SUFFIX}"]


def mask_path_for(category_dir: Path, defect_type: str, image_path: Path, suffix: str = ".png") -> Path:
    """Where the MVTec layout keeps the mask of ``image_path`` (a mask keeps its own file format)."""
    return category_dir / "ground_truth" / defect_type / f"{image_path.stem}{MASK_SUFFIX}{suffix}"


def build_sample_index(category_dir: Path, category: str) -> list[Sample]:
    """Index every image of one category in MVTec layout.

    Images in ``train/<x>`` with x != good are indexed as anomalous so that validation can reject
    them; masks are attached when a file exists, for good images too (validation rejects those).
    Files the index does not use are named by :func:`unused_files`.

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
                masks = mask_candidates(category_dir, defect_dir.name, image_path)
                samples.append(
                    Sample(
                        category=category,
                        split=split,
                        label=int(defect_dir.name != GOOD),
                        defect_type=defect_dir.name,
                        image_path=image_path,
                        mask_path=masks[0] if masks else None,
                    )
                )
    return samples


def unused_files(category_dir: Path, samples: list[Sample]) -> list[tuple[Path, str]]:
    """Files of a category folder the sample index does not use (or cannot pair), with why.

    Hidden files and the importer's own :data:`NOT_IMPORTED` list aside, every file must be an image
    or a mask the index uses; two images that share a mask name are named as well.
    """
    used = {s.image_path for s in samples} | {s.mask_path for s in samples if s.mask_path is not None}
    problems = [
        (path, why_unused(category_dir, path))
        for path in sorted(category_dir.rglob("*"))
        if path.is_file() and path not in used and not hidden(path, category_dir) and path.name != NOT_IMPORTED
    ]
    stems: dict[tuple[Path, str], list[Path]] = {}
    for s in samples:
        if s.label == 1:
            stems.setdefault((s.image_path.parent, s.image_path.stem), []).append(s.image_path)
    for paths in stems.values():
        if len(paths) > 1:
            names = " and ".join(p.name for p in paths)
            problems += [(p, f"{names} share one mask name ({p.stem}{MASK_SUFFIX}.*): rename one") for p in paths]
    return problems


def hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def why_unused(category_dir: Path, path: Path) -> str:
    """Why :func:`build_sample_index` does not use a file of the category folder."""
    parts = path.relative_to(category_dir).parts
    layout = "train/<class>/, test/<class>/ or ground_truth/<class>/<image name>_mask.<ext>"
    if len(parts) != 3 or parts[0] not in ("train", "test", "ground_truth"):
        return f"not in the dataset layout ({layout}): not used"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image of a supported format ({', '.join(sorted(IMAGE_SUFFIXES))}): not used"
    if parts[0] != "ground_truth":
        return "not used"
    if not path.stem.endswith(MASK_SUFFIX):
        return f"a mask's name must end in {MASK_SUFFIX} (ground_truth/<class>/<image name>{MASK_SUFFIX}.<ext>)"
    stem = path.stem.removesuffix(MASK_SUFFIX)
    if not any(p.stem == stem for p in list_images(category_dir / "test" / parts[1])):
        return f"mask of no image: test/{parts[1]}/{stem}.<ext> does not exist"
    return f"a second mask for test/{parts[1]}/{stem}: keep one"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link the file ``src`` is (links followed) to ``dst`` (no extra disk), copying when linking is not possible.

    The dataset never holds a symbolic link: its files stand without the source folder.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = Path(os.path.realpath(src))
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def import_mvtec_category(source_root: Path, category: str, dest: Path) -> list[Skipped]:
    """Bring one MVTec AD category (already in the target layout) into ``dest``; returns the files left out."""
    src = source_root / category
    if not (src / "train" / GOOD).is_dir():
        raise DatasetError(f"MVTec category not found: {src}/train/good. Check data.import_path and data.categories.")
    skipped = []
    for path in sorted(src.rglob("*")):
        if hidden(path, src) or path.is_dir():
            continue
        if not path.exists():
            skipped += usable([path])[1]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            link_or_copy(path, dest / path.relative_to(src))
        else:
            skipped.append(skipped_entry(path))
    return skipped


def save_binary_mask(mask: np.ndarray, path: Path) -> None:
    """Write a boolean mask as an 8-bit PNG with values 0 and 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def has_defect(mask_path: Path) -> bool:
    """Whether a mask marks any pixel (the one rule: a non-zero value is defect).

    Raises:
        ImageReadError: the mask cannot be read.
    """
    return bool(read_mask(mask_path).any())


def import_kolektor(source_root: Path, dest: Path, defect_type: str = "defect") -> list[Skipped]:
    """Import KolektorSDD2 (``train/`` and ``test/`` with ``<id>.png`` + ``<id>_GT.png``).

    Images whose mask marks no pixel are normal. Training keeps only normal images (the defects of
    ``train/`` are left out and named); test defects get their mask file, unchanged, as
    ``ground_truth/<defect_type>/<id>_mask.<ext>``. Returns the files left out: the empty masks of
    normal images, the training defects, and (blocking) images whose mask cannot be read.
    """
    skipped = []
    for split in ("train", "test"):
        split_dir = source_root / split
        listed, broken = usable(list_images(split_dir))
        images = [p for p in listed if not p.stem.endswith("_GT")]
        if not images:
            raise DatasetError(f"KolektorSDD2 split has no images: {split_dir}. Check data.import_path.")
        for image_path in images:
            skipped += import_kolektor_image(image_path, split, dest, defect_type)
        skipped += broken + left_out(split_dir, list_images(split_dir))
    return skipped


def import_kolektor_image(image_path: Path, split: str, dest: Path, defect_type: str) -> list[Skipped]:
    """One KolektorSDD2 image and its ``_GT`` mask into the layout; returns what was left out."""
    gt_path = image_path.with_name(f"{image_path.stem}_GT{image_path.suffix}")
    if not gt_path.is_file():
        raise DatasetError(f"KolektorSDD2 mask missing: {gt_path} (for {image_path}).")
    try:
        defect = has_defect(gt_path)
    except ImageReadError as err:
        if split == "train":  # normal or defect cannot be told: held back by validation
            return [Skipped(image_path, f"its mask cannot be read ({err}): normal or defect cannot be told", True)]
        defect = True  # a test image: imported as a defect with its mask as is, which validation names
    if not defect:
        link_or_copy(image_path, dest / split / GOOD / image_path.name)
        return [Skipped(gt_path, "empty mask of a normal image: normal images need none", False)]
    if split == "train":
        reason = "defect image in train/: training uses normal images only (KolektorSDD2 protocol)"
        return [Skipped(image_path, reason, False), Skipped(gt_path, "its mask", False)]
    link_or_copy(image_path, dest / "test" / defect_type / image_path.name)
    link_new(gt_path, mask_path_for(dest, defect_type, image_path, gt_path.suffix))
    return []


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


@dataclass(frozen=True)
class FolderSet:
    """A generic source: normal images, anomalous images, and their masks (``<stem><mask_suffix>.<ext>``)."""

    normal: Path
    anomalous: Path
    masks: Path
    mask_suffix: str


def import_folder_category(
    source: FolderSet,
    dest: Path,
    *,
    test_normal_fraction: float,
    seed: int,
    require_normals: bool = True,
) -> list[Skipped]:
    """Import a generic (normal, anomalous, masks) folder set into the MVTec layout; returns the files left out.

    A seeded, per-name share of the normal images goes to ``test/good`` (:func:`normal_split`);
    anomalous images go to ``test/anomalous`` with their mask file, unchanged (validation judges its
    values as for every source). An anomalous image without a mask is labelled by image only (image
    metrics use it, pixel metrics leave it out); a mask that pairs no anomalous image is left out
    and named. With ``require_normals=False`` (images added on top of another source) the folders
    may be empty or absent.
    """
    normals, broken = usable(list_images(source.normal))
    if not normals and require_normals:
        raise DatasetError(f"no normal images in {source.normal}. Check data.import_path and data.folder.normal.")
    for image_path in normals:
        split = normal_split(image_path.name, seed, test_normal_fraction)
        link_new(image_path, dest / split / GOOD / image_path.name)
    anomalous, broken_anomalous = usable(list_images(source.anomalous))
    masks, broken_masks = usable(list_images(source.masks))
    broken += broken_anomalous + broken_masks
    for image_path in anomalous:
        link_new(image_path, dest / "test" / "anomalous" / image_path.name)
    paired = pair_masks(source, anomalous, masks, dest)
    mask_stems = {m.stem for m in masks}
    if unmasked := sum(f"{a.stem}{source.mask_suffix}" not in mask_stems for a in anomalous):
        logger.info("%s: %d anomalous images have no mask (labelled by image only)", source.anomalous, unmasked)
    unpaired = [unpaired_mask(m, source, normals) for m in masks if m not in paired]
    folders = (source.normal, source.anomalous, source.masks)
    others = [entry for folder in folders for entry in left_out(folder, list_images(folder))]
    return broken + unpaired + others


def pair_masks(source: FolderSet, anomalous: list[Path], masks: list[Path], dest: Path) -> set[Path]:
    """Bring each anomalous image's mask file into the layout, as it is; returns the masks taken."""
    by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        by_stem.setdefault(mask.stem, []).append(mask)
    taken = set()
    for image_path in anomalous:
        for mask in by_stem.get(f"{image_path.stem}{source.mask_suffix}", []):  # two: validation names both
            target = mask_path_for(dest, "anomalous", image_path, mask.suffix)
            if not target.exists():  # x.png and x.jpg share it: validation names them
                link_or_copy(mask, target)
            taken.add(mask)
    return taken


def marks_defect(mask: Path) -> bool:
    """:func:`has_defect`, with an unreadable mask counted as marking one (so it is named, blocking)."""
    try:
        return has_defect(mask)
    except ImageReadError:
        return True


def unpaired_mask(mask: Path, source: FolderSet, normals: list[Path]) -> Skipped:
    """Why a mask file was not taken: it belongs to a normal image, or to no image at all."""
    stem = mask.stem.removesuffix(source.mask_suffix)
    normal = next((p for p in normals if p.stem == stem and mask.stem.endswith(source.mask_suffix)), None)
    if normal is not None and not marks_defect(mask):
        return Skipped(mask, f"empty mask of the normal image {normal.name}: normal images need none", False)
    if normal is not None:
        return Skipped(mask, f"marks defect pixels, but {normal.name} is in the normal folder: move one of them", True)
    rule = f"{source.anomalous.name}/<name>.<ext> has its mask as {source.masks.name}/<name>{source.mask_suffix}.<ext>"
    return Skipped(mask, f"mask of no anomalous image ({rule})", True)
