"""The MVTec AD folder layout: the sample index, and importers of other layouts into it.

Layout of one category::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect>/<name>.png
    <category>/ground_truth/<defect>/<name>_mask.png

Masks come in by one rule for every source (:class:`MaskImport`): with ``data.mask_threshold`` null a
mask file is brought as it is (validation then requires it two-level); with a threshold it is written
as a 0/255 PNG of the pixels whose value is above it, and annotation files (labelme, COCO, Label Studio;
:mod:`adps.data.annotations`) are always rasterised to such PNGs; every mask the importer wrote is
listed in ``<category>/masks.json`` with its source and the rule. A labelled defect whose mask marks no
pixel is kept, labelled by image only, and named (``data.empty_defect_mask: image_label``), or its
empty mask is brought in for validation to refuse (``refuse``). Source files that are not regular files
(a named pipe, a socket, a device) are refused by name, never opened.
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from adps.data.annotations import AnnotationError, ImageAnnotation, rasterise, read_annotation_file
from adps.data.images import decode_image, read_mask, special_kind
from adps.errors import DatasetError, ImageReadError
from adps.files import path_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
GOOD = "good"
MASK_SUFFIX = "_mask"
NOT_IMPORTED = "not_imported.csv"  # in a category folder: the source files its import left out, and why
MASK_MANIFEST = "masks.json"  # in a category folder: the masks its import wrote (thresholded, rasterised), and how
ANNOTATION_SUFFIX = ".json"
IMPORT_RECORDS = frozenset({NOT_IMPORTED, MASK_MANIFEST})


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


@dataclass
class MaskImport:
    """How masks come into the layout (``data.mask_threshold``, ``data.empty_defect_mask``), and a record of
    the masks the importer wrote itself (layout file -> (source file, how)) for :data:`MASK_MANIFEST`."""

    threshold: float | None = None
    empty_defect: str = "image_label"
    made: dict[Path, tuple[Path, str]] = field(default_factory=dict)

    def rule(self) -> str:
        if self.threshold is None:
            return "mask files as they are (defect = non-zero); annotations drawn as 0/255 PNG"
        return (
            f"defect = value > {self.threshold:g} on 0..255 (16-bit and float values scaled by 255 / their full "
            "scale), written as 0/255 PNG; annotations drawn as 0/255 PNG"
        )


def write_not_imported(dest: Path, skipped: list[Skipped], recorded: Callable[[Path], str]) -> None:
    """``dest/not_imported.csv``: one row per file left out (``file, reason, blocking``); none when nothing was.

    Names are written with :func:`adps.files.path_text` (a latin-1 name as ``\\xe9``), so no name breaks the file.
    """
    if not skipped:
        return
    rows = sorted(
        {(path_text(recorded(entry.source)), path_text(entry.reason), str(entry.blocking).lower()) for entry in skipped}
    )
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([("file", "reason", "blocking"), *rows])
    (dest / NOT_IMPORTED).write_text(buffer.getvalue(), encoding="utf-8")


def read_not_imported(category_dir: Path) -> list[dict[str, str]]:
    """The rows of a category's ``not_imported.csv`` (empty when its import left nothing out)."""
    path = category_dir / NOT_IMPORTED
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_mask_manifest(dest: Path, masks: MaskImport, recorded: Callable[[Path], str]) -> None:
    """``dest/masks.json``: the masks the import wrote (layout path -> source and how) and the rule; none when
    every mask came as it was. Sorted and without timestamps: the same import gives the same bytes."""
    if not masks.made:
        return
    made = {
        path_text(target.relative_to(dest)): f"{path_text(recorded(src))} ({how})"
        for target, (src, how) in masks.made.items()
    }
    record = {
        "mask_threshold": masks.threshold,
        "empty_defect_mask": masks.empty_defect,
        "rule": masks.rule(),
        "masks": dict(sorted(made.items())),
    }
    (dest / MASK_MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def list_images(folder: Path) -> list[Path]:
    """Image files of one folder, sorted, ignoring hidden files and other suffixes."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def usable(paths: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """Source files that can be taken, and the rest (named, blocking): broken links, and what is not a regular
    file (a named pipe, socket, device or folder named like an image), refused by kind without being opened."""
    taken, refused = [], []
    for path in paths:
        if not path.exists():
            refused.append(Skipped(path, "a link to a file that does not exist", True))
        elif kind := special_kind(path):
            refused.append(Skipped(path, f"{kind}, not a regular file: not read", True))
        else:
            taken.append(path)
    return taken, refused


def left_out(folder: Path, taken: list[Path]) -> list[Skipped]:
    """Everything in ``folder`` (hidden names aside) that is not among ``taken``, with why."""
    if not folder.is_dir():
        return []
    chosen = set(taken)
    return [
        skipped_entry(path, folder)
        for path in sorted(folder.iterdir())
        if path not in chosen and not path.name.startswith(".")
    ]


def skipped_entry(path: Path, folder: Path | None = None) -> Skipped:
    """Why a file or folder next to the imported images was not taken."""
    if path.is_dir() and folder is not None and copies_only(path, folder):
        return Skipped(path, "a subfolder holding only copies of files in the folder (same bytes): not read", False)
    if path.is_dir():
        return Skipped(path, "a subfolder is not read: put its images directly in the folder", True)
    if kind := special_kind(path):
        return Skipped(path, f"{kind}, not a regular file: not read", path.suffix.lower() in IMAGE_SUFFIXES)
    if path.suffix.lower() in Image.registered_extensions():
        formats = ", ".join(sorted(IMAGE_SUFFIXES))
        return Skipped(path, f"image format {path.suffix} is not imported (use one of {formats})", True)
    return Skipped(path, "not an image file", False)


def copies_only(subfolder: Path, folder: Path) -> bool:
    """Whether every file under ``subfolder`` is a regular file with a same-named, byte-identical file in
    ``folder`` (a stray copy, as BSData's ``data/BSD/test/``): leaving it out loses nothing."""
    for path in subfolder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        twin = folder / path.name
        if special_kind(path) or not path.exists() or not twin.is_file() or special_kind(twin):
            return False
        if not filecmp.cmp(path, twin, shallow=False):
            return False
    return True


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
        if (path.is_file() or special_kind(path) not in (None, "a folder"))
        and path not in used
        and not hidden(path, category_dir)
        and path.relative_to(category_dir).as_posix() not in IMPORT_RECORDS
    ]
    stems: dict[tuple[Path, str], list[Path]] = {}
    for s in samples:
        if s.label == 1:
            stems.setdefault((s.image_path.parent, s.image_path.stem), []).append(s.image_path)
    for paths in stems.values():
        if len(paths) > 1:
            names = " and ".join(path_text(p.name) for p in paths)
            problems += [
                (p, f"{names} share one mask name ({path_text(p.stem)}{MASK_SUFFIX}.*): rename one") for p in paths
            ]
    return problems


def hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def why_unused(category_dir: Path, path: Path) -> str:
    """Why :func:`build_sample_index` does not use a file of the category folder."""
    parts = tuple(path_text(part) for part in path.relative_to(category_dir).parts)
    layout = "train/<class>/, test/<class>/ or ground_truth/<class>/<image name>_mask.<ext>"
    if kind := special_kind(path):
        return f"{kind}, not a regular file: not read"
    if len(parts) != 3 or parts[0] not in ("train", "test", "ground_truth"):
        return f"not in the dataset layout ({layout}): not used"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image of a supported format ({', '.join(sorted(IMAGE_SUFFIXES))}): not used"
    if parts[0] != "ground_truth":
        return "not used"
    if not path.stem.endswith(MASK_SUFFIX):
        return f"a mask's name must end in {MASK_SUFFIX} (ground_truth/<class>/<image name>{MASK_SUFFIX}.<ext>)"
    stem = path.stem.removesuffix(MASK_SUFFIX)
    if not any(p.stem == stem for p in list_images(path.parent.parent.parent / "test" / path.parent.name)):
        return f"mask of no image: test/{parts[1]}/{path_text(stem)}.<ext> does not exist"
    return f"a second mask for test/{parts[1]}/{path_text(stem)}: keep one"


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


def import_mvtec_category(
    source_root: Path, category: str, dest: Path, masks: MaskImport | None = None
) -> list[Skipped]:
    """Bring one MVTec AD category (already in the target layout) into ``dest``; returns the files left out.

    Images come as they are; masks of ``ground_truth/<defect>/<name>_mask.<ext>`` by :func:`bring_mask`.
    """
    masks = masks or MaskImport()
    src = source_root / category
    if not (src / "train" / GOOD).is_dir():
        raise DatasetError(f"MVTec category not found: {src}/train/good. Check data.import_path and data.categories.")
    skipped = []
    for path in sorted(src.rglob("*")):
        if hidden(path, src) or path.is_dir():
            continue
        taken, refused = usable([path])
        skipped += refused
        relative = path.relative_to(src)
        if not taken:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(skipped_entry(path))
        elif is_layout_mask(relative):
            stem, images = path.stem.removesuffix(MASK_SUFFIX), list_images(src / "test" / relative.parts[1])
            image = next((p for p in images if p.stem == stem), src / "test" / relative.parts[1] / f"{stem}.png")
            skipped += bring_mask(path, image, dest / relative.parent, masks)
        else:
            link_or_copy(path, dest / relative)
    return skipped


def is_layout_mask(relative: Path) -> bool:
    """``ground_truth/<defect>/<name>_mask.<ext>`` of a defect class (a good image's mask is validation's to name)."""
    parts = relative.parts
    return len(parts) == 3 and parts[0] == "ground_truth" and parts[1] != GOOD and relative.stem.endswith(MASK_SUFFIX)


def save_binary_mask(mask: np.ndarray, path: Path) -> None:
    """Write a boolean mask as an 8-bit PNG with values 0 and 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def has_defect(mask_path: Path, threshold: float | None = None) -> bool:
    """Whether a mask marks any pixel, by the one rule (:func:`adps.data.images.mask_defect`).

    Raises:
        ImageReadError: the mask cannot be read.
    """
    return bool(read_mask(mask_path, threshold).any())


def read_defect(mask: Path, threshold: float | None) -> np.ndarray | None:
    """A mask file's defect pixels by the rule, or None when it cannot be read (validation names it)."""
    try:
        return read_mask(mask, threshold)
    except ImageReadError:
        return None


def bring_mask(mask: Path, image: Path, target_dir: Path, masks: MaskImport) -> list[Skipped]:
    """One labelled defect's mask file into ``target_dir`` as ``<image stem>_mask``, by the rule; returns the rows
    of what was left out: a mask marking no pixel is left out and named (``image_label``), or brought for
    validation to refuse (``refuse``)."""
    defect = read_defect(mask, masks.threshold)
    if defect is not None and not defect.any() and masks.empty_defect == "image_label":
        return [empty_defect_row(mask, "marks no pixel", image)]
    place_mask_file(mask, defect, image, target_dir, masks)
    return []


def place_mask_file(mask: Path, defect: np.ndarray | None, image: Path, target_dir: Path, masks: MaskImport) -> None:
    """A mask file as it is (threshold null, or unreadable: validation names it), else its ``defect`` pixels as a
    0/255 PNG, recorded in the manifest. A target already there (x.png and x.jpg share it) is left for validation."""
    if defect is None or masks.threshold is None:
        target = target_dir / f"{image.stem}{MASK_SUFFIX}{mask.suffix}"
        if not target.exists():
            link_or_copy(mask, target)
        return
    target = target_dir / f"{image.stem}{MASK_SUFFIX}.png"
    if not target.exists():
        save_binary_mask(defect, target)
        masks.made[target] = (mask, f"value > {masks.threshold:g}")


def empty_defect_row(source: Path, what: str, image: Path) -> Skipped:
    """The row of a labelled defect whose mask marks nothing: kept, labelled by image only (not blocking)."""
    return Skipped(
        source,
        f"{what}: {path_text(image.name)} is kept as a defect labelled by image only (data.empty_defect_mask: "
        "image_label; image metrics use it, pixel metrics leave it out)",
        False,
    )


def import_kolektor(
    source_root: Path, dest: Path, defect_type: str = "defect", masks: MaskImport | None = None
) -> list[Skipped]:
    """Import KolektorSDD2 (``train/`` and ``test/`` with ``<id>.png`` + ``<id>_GT.png``).

    Images whose mask marks no pixel (by the mask rule) are normal. Training keeps only normal images (the
    defects of ``train/`` are left out and named); test defects get their mask by :func:`bring_mask` as
    ``ground_truth/<defect_type>/<id>_mask.<ext>``. Returns the files left out: the empty masks of normal
    images, the training defects, and (blocking) images whose mask cannot be read or is not a regular file.
    """
    masks = masks or MaskImport()
    skipped = []
    for split in ("train", "test"):
        split_dir = source_root / split
        listed, refused = usable(list_images(split_dir))
        images = [p for p in listed if not p.stem.endswith("_GT")]
        if not images:
            raise DatasetError(f"KolektorSDD2 split has no images: {split_dir}. Check data.import_path.")
        for image_path in images:
            skipped += import_kolektor_image(image_path, split, dest, defect_type, masks)
        skipped += refused + left_out(split_dir, list_images(split_dir))
    return skipped


def import_kolektor_image(
    image_path: Path, split: str, dest: Path, defect_type: str, masks: MaskImport
) -> list[Skipped]:
    """One KolektorSDD2 image and its ``_GT`` mask into the layout; returns what was left out."""
    gt_path = image_path.with_name(f"{image_path.stem}_GT{image_path.suffix}")
    if kind := special_kind(gt_path):
        return [
            Skipped(image_path, f"its mask {path_text(gt_path.name)} is {kind}: normal or defect cannot be told", True)
        ]
    if not gt_path.is_file():
        raise DatasetError(f"KolektorSDD2 mask missing: {path_text(gt_path)} (for {path_text(image_path)}).")
    try:
        defect = has_defect(gt_path, masks.threshold)
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
    if any(dest.joinpath("ground_truth", defect_type).glob(f"{image_path.stem}{MASK_SUFFIX}.*")):
        other = f"another image named {path_text(image_path.stem)}"
        raise DatasetError(f"{path_text(gt_path)} would replace the mask of {other}: rename one.")
    return bring_mask(gt_path, image_path, dest / "ground_truth" / defect_type, masks)


def normal_split(name: str, seed: int, test_fraction: float) -> str:
    """``test`` or ``train`` for a normal image, decided by its name alone (seeded hash of the name's bytes).

    An image keeps its split when others are added or removed, so new images arriving in a source
    folder change only what they add, never where the existing ones sit.
    """
    digest = hashlib.sha256(f"{seed}:".encode() + os.fsencode(name)).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def link_new(src: Path, dst: Path) -> None:
    """:func:`link_or_copy` that refuses to replace a file already imported under the same name."""
    if dst.exists():
        raise DatasetError(
            f"{path_text(src)} would replace {path_text(dst)}, imported from elsewhere: rename one of them."
        )
    link_or_copy(src, dst)


@dataclass(frozen=True)
class FolderSet:
    """A generic source: normal images, anomalous images, and their masks (``<stem><mask_suffix>.<ext>``) or
    annotation files (``*.json``) in ``masks``. ``normal`` == ``anomalous``: one folder, split by the masks."""

    normal: Path
    anomalous: Path
    masks: Path
    mask_suffix: str

    @property
    def shared(self) -> bool:
        """One folder of images, defect or normal by whether a mask or annotation marks a pixel (BSData)."""
        return os.path.abspath(self.normal) == os.path.abspath(self.anomalous)


@dataclass(frozen=True)
class MaskSource:
    """Where an image's mask comes from: a mask file, or one entry of an annotation file."""

    path: Path
    annotation: ImageAnnotation | None = None

    @property
    def what(self) -> str:
        """``mask``, or the annotation entry (``labelme``, ``COCO images[id=3] (x.png)``, ``Label Studio task 5``)."""
        return self.annotation.where if self.annotation is not None else "mask"

    def listed_alone(self) -> bool:
        """Whether the source is a file of its own (a mask, a labelme file) rather than one entry of a shared file."""
        return self.annotation is None or self.annotation.fmt == "labelme"


def import_folder_category(
    source: FolderSet,
    dest: Path,
    *,
    test_normal_fraction: float,
    seed: int,
    require_normals: bool = True,
    masks: MaskImport | None = None,
) -> list[Skipped]:
    """Import a generic (normal, anomalous, masks) folder set into the MVTec layout; returns the files left out.

    A seeded, per-name share of the normal images goes to ``test/good`` (:func:`normal_split`);
    anomalous images go to ``test/anomalous`` with their mask, by the mask rule (:func:`bring_mask`), or
    rasterised from annotation files. An anomalous image without a mask is labelled by image only (image
    metrics use it, pixel metrics leave it out); a mask that pairs no image is left out and named. When
    ``normal`` and ``anomalous`` are one folder, an image whose mask or annotation marks a pixel is a
    defect and every other image normal. With ``require_normals=False`` (images added on top of another
    source) the folders may be empty or absent.
    """
    masks = masks or MaskImport()
    mask_files, skipped = usable(mask_listing(source))
    normals, refused = usable(image_listing(source, source.normal))
    anomalous, refused_anomalous = ([], []) if source.shared else usable(image_listing(source, source.anomalous))
    skipped += refused + refused_anomalous
    if not normals and require_normals:
        raise DatasetError(f"no normal images in {source.normal}. Check data.import_path and data.folder.normal.")
    annotation_files, refused_json = usable(list_annotation_files(source.masks))
    entries, unreadable = read_annotations(annotation_files)
    skipped += refused_json + unreadable
    pairs, unpaired = pair_sources(source, normals + anomalous, mask_files, entries)
    for image_path in anomalous:
        skipped += import_labelled_defect(image_path, pairs.get(image_path, []), dest, masks)
    for image_path in normals:
        place = import_shared_image if source.shared else import_normal_image
        skipped += place(image_path, pairs.get(image_path, []), dest, masks, seed, test_normal_fraction)
    if unmasked := sum(not pairs.get(a) for a in anomalous):
        logger.info("%s: %d anomalous images have no mask (labelled by image only)", source.anomalous, unmasked)
    skipped += unpaired
    folders = dict.fromkeys((source.normal, source.anomalous, source.masks))  # one folder may serve twice
    taken = {*normals, *anomalous, *mask_files, *list_annotation_files(source.masks)}
    return skipped + [entry for folder in folders for entry in left_out(folder, [*list_images(folder), *taken])]


def masks_among_images(source: FolderSet) -> bool:
    """Whether the masks folder is an image folder too (``x.png`` beside ``x_mask.png``, labelme's ``x.json``)."""
    images = {os.path.abspath(source.normal), os.path.abspath(source.anomalous)}
    return os.path.abspath(source.masks) in images


def mask_listing(source: FolderSet) -> list[Path]:
    """The mask files of the masks folder: its images, or, when it holds the images too, those named as masks."""
    listed = list_images(source.masks)
    if masks_among_images(source):
        return [p for p in listed if p.stem.endswith(source.mask_suffix)]
    return listed


def image_listing(source: FolderSet, folder: Path) -> list[Path]:
    """The images of ``folder``, without the mask files when the masks folder is the same folder."""
    listed = list_images(folder)
    if masks_among_images(source) and os.path.abspath(folder) == os.path.abspath(source.masks):
        return [p for p in listed if not p.stem.endswith(source.mask_suffix)]
    return listed


def list_annotation_files(folder: Path) -> list[Path]:
    """The JSON files of a masks folder (labelme, COCO, Label Studio), sorted, hidden ones aside."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ANNOTATION_SUFFIX and not p.name.startswith("."))


def read_annotations(files: list[Path]) -> tuple[list[ImageAnnotation], list[Skipped]]:
    """Every image entry of the annotation files, and a blocking row per file that cannot be read."""
    entries, refused = [], []
    for path in files:
        try:
            entries += read_annotation_file(path)
        except AnnotationError as err:
            refused.append(Skipped(path, str(err), True))
    return entries, refused


def pair_sources(
    source: FolderSet, images: list[Path], mask_files: list[Path], entries: list[ImageAnnotation]
) -> tuple[dict[Path, list[MaskSource]], list[Skipped]]:
    """Each image's mask sources (mask files by ``<stem><mask_suffix>``, annotation entries by file name), and
    a row for each source that belongs to no image."""
    by_stem: dict[str, list[Path]] = {}
    by_name: dict[str, Path] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
        by_name.setdefault(image.name, image)
    pairs: dict[Path, list[MaskSource]] = {}
    unpaired = []
    for mask in mask_files:
        stem = mask.stem.removesuffix(source.mask_suffix) if mask.stem.endswith(source.mask_suffix) else None
        owners = by_stem.get(stem, []) if stem is not None else []
        for owner in owners:  # x.png and x.jpg share it: validation names them
            pairs.setdefault(owner, []).append(MaskSource(mask))
        if not owners:
            unpaired.append(unpaired_mask(mask, source))
    for entry in entries:
        owner = annotated_image(entry, by_name, by_stem)
        if owner is not None:
            pairs.setdefault(owner, []).append(MaskSource(entry.source, entry))
        elif entry.regions or entry.fmt == "labelme":
            unpaired.append(unpaired_annotation(entry, source))
    return pairs, unpaired


def annotated_image(entry: ImageAnnotation, by_name: dict[str, Path], by_stem: dict[str, list[Path]]) -> Path | None:
    """The image an annotation entry names: by file name first, else by its file's stem (labelme)."""
    for name in entry.names:
        if name in by_name:
            return by_name[name]
    stems = by_stem.get(entry.stem, []) if entry.stem else []
    return stems[0] if len(stems) == 1 else None


def unpaired_mask(mask: Path, source: FolderSet) -> Skipped:
    """Why a mask file was not taken: it belongs to no image."""
    rule = f"{source.anomalous.name}/<name>.<ext> has its mask as {source.masks.name}/<name>{source.mask_suffix}.<ext>"
    return Skipped(mask, f"mask of no anomalous image ({path_text(rule)})", True)


def unpaired_annotation(entry: ImageAnnotation, source: FolderSet) -> Skipped:
    """Why an annotation entry was not used: the image it names is in none of the image folders."""
    named = entry.names[0] if entry.names else f"{entry.stem}.<ext>"
    folders = " or ".join(dict.fromkeys(path_text(f.name) for f in (source.normal, source.anomalous)))
    return Skipped(entry.source, f"{entry.where}: annotates {path_text(named)}, which is not in {folders}", True)


@dataclass(frozen=True)
class MaskRead:
    """An image's mask as read by the rule: defect pixels, or None and why (``problem``; empty: a mask file that
    does not decode, which is brought as it is for validation to name)."""

    defect: np.ndarray | None
    problem: str = ""


def read_source(src: MaskSource, image: Path, threshold: float | None) -> MaskRead:
    """A mask file by the rule, or an annotation entry drawn at the image's own size (read by the one decoder)."""
    if src.annotation is None:
        return MaskRead(read_defect(src.path, threshold))
    try:
        size = decode_image(image).size
    except ImageReadError as err:
        return MaskRead(None, f"{src.what}: its image cannot be read ({err}), so it is not drawn")
    try:
        return MaskRead(rasterise(src.annotation, size))
    except AnnotationError as err:
        return MaskRead(None, f"{err} ({path_text(image.name)})")


def write_defect_mask(src: MaskSource, read: MaskRead, image: Path, target_dir: Path, masks: MaskImport) -> None:
    """A defect's mask into the layout: a mask file by :func:`place_mask_file`, an annotation as a 0/255 PNG."""
    if src.annotation is None:
        place_mask_file(src.path, read.defect, image, target_dir, masks)
        return
    target = target_dir / f"{image.stem}{MASK_SUFFIX}.png"
    if not target.exists():
        save_binary_mask(read.defect, target)
        count = len(src.annotation.regions)
        masks.made[target] = (src.path, f"{src.annotation.where}: {count} region{'' if count == 1 else 's'} drawn")


def import_labelled_defect(image: Path, sources: list[MaskSource], dest: Path, masks: MaskImport) -> list[Skipped]:
    """An image of the anomalous folder into ``test/anomalous``, with its mask when it has one."""
    link_new(image, dest / "test" / "anomalous" / image.name)
    if not sources:
        return []
    if len(sources) > 1:
        return [two_sources_row(image, sources)]
    src = sources[0]
    read = read_source(src, image, masks.threshold)
    if read.problem:
        return [Skipped(src.path, read.problem, True)]
    if read.defect is not None and not read.defect.any() and masks.empty_defect == "image_label":
        return [empty_defect_row(src.path, f"{src.what} marks no pixel", image)]
    write_defect_mask(src, read, image, dest / "ground_truth" / "anomalous", masks)
    return []


def two_sources_row(image: Path, sources: list[MaskSource]) -> Skipped:
    names = " and ".join(path_text(f"{s.path.name} ({s.what})") for s in sources)
    return Skipped(sources[-1].path, f"{names} both give the mask of {path_text(image.name)}: keep one", True)


def import_normal_image(
    image: Path, sources: list[MaskSource], dest: Path, masks: MaskImport, seed: int, test_fraction: float
) -> list[Skipped]:
    """An image of the normal folder into train/good or test/good; a mask or annotation of it is named."""
    link_new(image, dest / normal_split(image.name, seed, test_fraction) / GOOD / image.name)
    rows = [normal_image_row(src, read_source(src, image, masks.threshold), image) for src in sources]
    return [row for row in rows if row is not None]


def normal_image_row(src: MaskSource, read: MaskRead, image: Path) -> Skipped | None:
    """Why the mask or annotation of a normal image was not taken: blocking when it marks (or may mark) a defect;
    named when it is a file of its own marking nothing; nothing for an empty entry of a shared file (COCO)."""
    name = path_text(image.name)
    if read.defect is not None and not read.defect.any():
        if not src.listed_alone():
            return None
        what = "empty mask" if src.annotation is None else f"{src.what} marking no pixel"
        return Skipped(src.path, f"{what} of the normal image {name}: normal images need none", False)
    if read.problem:
        return Skipped(src.path, read.problem, True)
    found = "marks defect pixels" if read.defect is not None else "cannot be read"
    return Skipped(src.path, f"{src.what} {found}, but {name} is in the normal folder: move one of them", True)


def import_shared_image(
    image: Path, sources: list[MaskSource], dest: Path, masks: MaskImport, seed: int, test_fraction: float
) -> list[Skipped]:
    """An image of a folder that holds normal and defect images alike: a defect when its mask or annotation
    marks a pixel (into ``test/anomalous`` with it), else normal; left out when that cannot be told."""
    if len(sources) > 1:
        return [two_sources_row(image, sources), Skipped(image, "normal or defect cannot be told: not imported", True)]
    read = read_source(sources[0], image, masks.threshold) if sources else MaskRead(np.zeros(0, bool))
    if read.defect is None:
        why = read.problem or f"its mask {path_text(sources[0].path.name)} cannot be read"
        return [Skipped(sources[0].path, f"{why}: normal or defect of {path_text(image.name)} cannot be told", True)]
    if read.defect.any():
        link_new(image, dest / "test" / "anomalous" / image.name)
        write_defect_mask(sources[0], read, image, dest / "ground_truth" / "anomalous", masks)
        return []
    link_new(image, dest / normal_split(image.name, seed, test_fraction) / GOOD / image.name)
    if sources and sources[0].listed_alone():
        reason = f"{sources[0].what} marks no pixel: {path_text(image.name)} is normal (normal images need none)"
        return [Skipped(sources[0].path, reason, False)]
    return []
