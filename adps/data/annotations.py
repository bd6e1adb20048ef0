"""Annotation files as masks: labelme, COCO and Label Studio JSON exports, rasterised at the image's size.

Most teams draw defects in a labelling tool and export shapes, not mask images. The folder source
reads such files from its masks folder (``data.folder.masks``); the format is told by content:

- **labelme**: one JSON per image (``shapes``, ``imagePath``, ``imageWidth``/``imageHeight``); shapes
  ``polygon``, ``rectangle`` and ``circle`` are drawn; ``line``, ``linestrip``, ``point``, ``mask`` and
  others are refused by name (a line or a point has no area). The image is the one ``imagePath``
  names (its base name, Windows separators too), else the one whose stem is the JSON file's.
- **COCO**: one JSON (``images``, ``annotations``); ``segmentation`` as polygons (flat ``[x1, y1, x2,
  y2, ...]`` lists) or as RLE (``{"size": [h, w], "counts": ...}``, column-major, starting with a run of
  background), with compressed string counts (COCO's own 6-bit encoding) or an uncompressed list
  (``iscrowd`` 1 or 0, both read as defect). An annotation with no segmentation (a box only) is refused.
  The image is ``file_name``'s base name.
- **Label Studio** JSON export: a list of tasks; each non-cancelled ``annotations[].result[]`` is read
  (predictions are not labels): ``brushlabels`` (Label Studio's bit-packed RLE of the RGBA layer, its
  alpha channel is the mask), ``polygonlabels`` (points in percent of ``original_width`` and
  ``original_height``) and unrotated ``rectanglelabels``; image-level results (``choices``,
  ``textarea``, ...) are ignored, other region types refused by name. The image is the base name of
  ``data.image`` (a URL, an upload path, or ``?d=`` of local storage); Label Studio prefixes uploads
  with an 8-hex-digit hash (``1a2b3c4d-x.png``), which is dropped when the name with it matches no image.

Every region marks defect, whatever its label. Coordinates are pixels from the image's top-left
corner, as the tools store them; a pixel (column x, row y) is defect when the point (x, y) lies inside
or on the outline of a polygon or rectangle, or within a circle's radius. The rule is computed here
(not by a drawing library) so a mask is the same bytes whatever the library versions. The size a file
states for its image must equal the image's own size (after its EXIF orientation), else the entry is
refused naming both.
"""

from __future__ import annotations

import json
import math
import ntpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from adps.errors import DatasetError

Array = np.ndarray
Draw = Callable[[int, int], Array]  # (width, height) -> (H, W) bool
EPS = 1e-9  # float slack for points that lie on a pixel exactly
MAX_COORDINATE = 1e6  # px: no image is that large (validation.max_side is at most 65535)
UNREADABLE = (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError, MemoryError)
LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
LS_IMAGE_LEVEL = frozenset({"choices", "textarea", "rating", "taxonomy", "number", "datetime", "pairwise", "ranker"})


class AnnotationError(DatasetError):
    """An annotation file or entry that cannot be read as a mask; the message names the file and the entry."""


@dataclass(frozen=True)
class Region:
    """One drawn region of an image: where it is in its file, and how it rasterises."""

    entry: str
    draw: Draw


@dataclass(frozen=True)
class ImageAnnotation:
    """What one annotation file says about one image.

    ``names``: the image's file names, most likely first; ``stem``: a fallback (any image suffix);
    ``stated_size``: (width, height) the file states, when it does; no regions: the image marks nothing.
    """

    source: Path
    fmt: str
    entry: str
    names: tuple[str, ...]
    stem: str | None
    stated_size: tuple[int, int] | None
    regions: tuple[Region, ...]

    @property
    def where(self) -> str:
        return f"{self.fmt} {self.entry}" if self.entry else self.fmt


def read_annotation_file(path: Path) -> list[ImageAnnotation]:
    """Every image entry of a labelme, COCO or Label Studio JSON file (told by content).

    Raises:
        AnnotationError: not JSON, not one of the three formats, or an entry that cannot be read.
    """
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, OSError, RecursionError) as err:
        raise AnnotationError(f"not a readable JSON file ({failure(err)}): not used as annotations") from err
    try:
        return annotation_entries(doc, path)
    except UNREADABLE as err:  # a value of a type or size no entry reader expected: the file, never the run
        raise AnnotationError(f"an entry holds a value that cannot be read ({failure(err)})") from err


def failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"


def annotation_entries(doc: Any, path: Path) -> list[ImageAnnotation]:
    """The entries of a parsed annotation file, by its format (told by content)."""
    if isinstance(doc, dict) and "shapes" in doc:
        return [labelme_entry(doc, path)]
    if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
        return coco_entries(doc, path)
    tasks = [doc] if isinstance(doc, dict) and "data" in doc else doc
    if isinstance(tasks, list) and tasks and all(isinstance(t, dict) and "data" in t for t in tasks):
        return [label_studio_entry(task, n, path) for n, task in enumerate(tasks)]
    raise AnnotationError(
        "a JSON file that is not a labelme file (shapes), a COCO file (images, annotations) or a Label "
        "Studio export (a list of tasks with data and annotations): not used as annotations"
    )


def rasterise(annotation: ImageAnnotation, size: tuple[int, int]) -> Array:
    """The union of an entry's regions as (H, W) booleans for an image of ``size`` (width, height).

    Raises:
        AnnotationError: the file states another size for the image, or a region does not fit it.
    """
    if annotation.stated_size is not None and tuple(annotation.stated_size) != tuple(size):
        stated, own = annotation.stated_size, size
        raise AnnotationError(
            f"{annotation.where} states the image is {stated[0]} x {stated[1]} px, the image is {own[0]} x "
            f"{own[1]} px (after its EXIF orientation): annotate the image as it is, or fix the stated size"
        )
    mask = np.zeros((size[1], size[0]), bool)
    for region in annotation.regions:
        try:
            mask |= region.draw(*size)
        except UNREADABLE as err:
            raise AnnotationError(f"{annotation.where} {region.entry}: cannot be drawn ({failure(err)})") from err
    return mask


def base_name(text: str) -> str:
    """A file name from a path of either separator style."""
    return ntpath.basename(text.replace("\\", "/").rstrip("/"))


# --- labelme -------------------------------------------------------------------------------------------


def labelme_entry(doc: dict[str, Any], path: Path) -> ImageAnnotation:
    shapes = doc.get("shapes")
    if not isinstance(shapes, list):
        raise AnnotationError("labelme: shapes is not a list")
    regions = tuple(labelme_region(shape, n) for n, shape in enumerate(shapes))
    image_path = doc.get("imagePath")
    names = (base_name(image_path),) if isinstance(image_path, str) and image_path else ()
    width, height = doc.get("imageWidth"), doc.get("imageHeight")
    stated = (width, height) if type(width) is int and type(height) is int else None
    return ImageAnnotation(path, "labelme", "", names, path.stem, stated, regions)


def labelme_region(shape: Any, n: int) -> Region:
    """One labelme shape as a region; a shape type with no area, or unknown, is refused by name."""
    entry = f"shapes[{n}]"
    if not isinstance(shape, dict):
        raise AnnotationError(f"labelme {entry}: not a shape object")
    kind = shape.get("shape_type") or "polygon"  # labelme before 3.x wrote polygons without a type
    points = point_list(shape.get("points"), f"labelme {entry} ({kind})")
    entry = f"{entry} ({kind})"
    if kind == "polygon" and len(points) >= 3:
        return Region(entry, lambda w, h: fill_polygon(points, w, h))
    if kind == "rectangle" and len(points) == 2:
        return Region(entry, lambda w, h: fill_rectangle(points, w, h))
    if kind == "circle" and len(points) == 2:
        return Region(entry, lambda w, h: fill_circle(points, w, h))
    if kind in ("polygon", "rectangle", "circle"):
        raise AnnotationError(f"labelme {entry}: {len(points)} points is not a {kind}")
    raise AnnotationError(
        f"labelme {entry}: shape type {kind!r} is not read (a line or a point has no area): draw defects "
        "as polygon, rectangle or circle"
    )


def point_list(value: Any, where: str) -> Array:
    """``[[x, y], ...]`` as an (N, 2) float array of finite numbers."""
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: points are not [[x, y], ...] numbers") from err
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise AnnotationError(f"{where}: points are not [[x, y], ...] finite numbers")
    return within_reach(points, where)


def within_reach(points: Array, where: str) -> Array:
    """Coordinates refused when no image could hold them (a typo, or a file made to overflow the drawing)."""
    if np.abs(points).max(initial=0.0) > MAX_COORDINATE:
        raise AnnotationError(f"{where}: a coordinate beyond +-{MAX_COORDINATE:g} px lies outside any image")
    return points


# --- COCO ----------------------------------------------------------------------------------------------


def coco_entries(doc: dict[str, Any], path: Path) -> list[ImageAnnotation]:
    images, annotations = doc.get("images"), doc.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise AnnotationError("COCO: images and annotations must be lists")
    by_image: dict[Any, list[Region]] = {}
    for n, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise AnnotationError(f"COCO annotations[{n}]: not an object")
        by_image.setdefault(coco_id(annotation.get("image_id"), f"annotations[{n}].image_id"), []).append(
            coco_region(annotation, n)
        )
    entries, known = [], set()
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            raise AnnotationError(f"COCO images[{n}]: no file_name")
        known.add(coco_id(image.get("id"), f"images[{n}].id"))
        width, height = image.get("width"), image.get("height")
        stated = (width, height) if type(width) is int and type(height) is int else None
        entry = f"images[id={image.get('id')}] ({image['file_name']})"
        names = (base_name(image["file_name"]),)
        regions = tuple(by_image.get(image.get("id"), []))
        entries.append(ImageAnnotation(path, "COCO", entry, names, None, stated, regions))
    if orphans := sorted(str(i) for i in by_image if i not in known):
        raise AnnotationError(f"COCO annotations name image_id {', '.join(orphans)}, which images does not list")
    return entries


def coco_id(value: Any, where: str) -> int | str | None:
    """An image id as COCO writes it: a whole number or a string (None: missing, matched as such)."""
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise AnnotationError(f"COCO {where}: an id must be a number or a string, not {type(value).__name__}")


def coco_region(annotation: dict[str, Any], n: int) -> Region:
    entry = f"annotations[id={annotation.get('id', n)}]"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        return Region(f"{entry} (RLE)", lambda w, h: coco_rle_mask(segmentation, w, h, entry))
    if isinstance(segmentation, list) and segmentation:
        polygons = [coco_polygon(flat, f"COCO {entry}") for flat in segmentation]
        return Region(f"{entry} (polygon)", lambda w, h: fill_polygons(polygons, w, h))
    raise AnnotationError(
        f"COCO {entry}: no segmentation (a box only marks where, not which pixels): export polygons or RLE masks"
    )


def coco_polygon(flat: Any, where: str) -> Array:
    if not isinstance(flat, list) or len(flat) < 6 or len(flat) % 2:
        raise AnnotationError(f"{where}: a polygon must be a flat list [x1, y1, x2, y2, ...] of 3 points or more")
    return point_list(list(zip(flat[0::2], flat[1::2], strict=True)), where)


def coco_rle_mask(rle: dict[str, Any], width: int, height: int, entry: str) -> Array:
    """A COCO RLE (compressed string or uncompressed list counts) as (H, W) booleans."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2) or list(size) != [height, width]:
        raise AnnotationError(
            f"COCO {entry}: RLE size {size} ([height, width]) differs from the image's [{height}, {width}]"
        )
    if isinstance(counts, str):
        runs = coco_string_counts(counts, entry)
    elif isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
        runs = counts
    else:
        raise AnnotationError(f"COCO {entry}: RLE counts must be a string or a list of non-negative integers")
    if sum(runs) != width * height:
        raise AnnotationError(f"COCO {entry}: RLE counts add up to {sum(runs)} pixels, the image has {width * height}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate background, defect, background...
    return np.repeat(values, runs).reshape((height, width), order="F")


def coco_string_counts(text: str, entry: str) -> list[int]:
    """COCO's compressed RLE counts: 5 bits per character (offset 48), 0x20 = more, 0x10 of the last = sign;
    from the fourth run on, each value is the difference to the run two before (pycocotools' rleFrString)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise AnnotationError(f"COCO {entry}: RLE counts string ends inside a number")
            char = ord(text[position]) - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position, shift = position + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise AnnotationError(f"COCO {entry}: RLE counts decode to a negative run")
        counts.append(value)
    return counts


# --- Label Studio --------------------------------------------------------------------------------------


def label_studio_entry(task: dict[str, Any], n: int, path: Path) -> ImageAnnotation:
    entry = f"task {task.get('id', f'[{n}]')}"
    names = label_studio_names(task, entry)
    regions, sizes = [], set()
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise AnnotationError(f"Label Studio {entry}: annotations is not a list")
    for a, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        for r, result in enumerate(annotation.get("result") or []):
            where = f"{entry} annotations[{a}].result[{r}]"
            region = label_studio_region(result, where)
            if region is not None:
                regions.append(region)
                sizes.add((result.get("original_width"), result.get("original_height")))
    if len(sizes) > 1:
        raise AnnotationError(f"Label Studio {entry}: results state different image sizes {sorted(sizes)}")
    stated = next(iter(sizes)) if sizes else None
    return ImageAnnotation(path, "Label Studio", entry, names, None, stated, tuple(regions))


def label_studio_names(task: dict[str, Any], entry: str) -> tuple[str, ...]:
    """The image's file name from ``data.image`` (else the one data value naming a file), without and with
    Label Studio's upload prefix."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise AnnotationError(f"Label Studio {entry}: data is not an object")
    value = data.get("image")
    if not isinstance(value, str):
        value = next((v for v in data.values() if isinstance(v, str) and "." in base_name(v)), None)
    if value is None:
        raise AnnotationError(f"Label Studio {entry}: data.image names no image file")
    url = urlparse(value)
    local = parse_qs(url.query).get("d")  # local storage: /data/local-files/?d=folder/x.png
    name = base_name(unquote(local[0] if local else url.path))
    stripped = LS_UPLOAD_PREFIX.sub("", name)
    return (name, stripped) if stripped != name else (name,)


def label_studio_region(result: Any, where: str) -> Region | None:
    """One result as a region; None for image-level results (choices...); other region types refused."""
    if not isinstance(result, dict):
        raise AnnotationError(f"Label Studio {where}: not an object")
    kind = str(result.get("type", "")).lower()
    value = result.get("value") if isinstance(result.get("value"), dict) else {}
    if kind in LS_IMAGE_LEVEL:
        return None
    width, height = result.get("original_width"), result.get("original_height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise AnnotationError(f"Label Studio {where} ({kind}): no original_width and original_height")
    where = f"{where} ({kind})"
    if kind in ("brushlabels", "brush"):
        rle = value.get("rle", result.get("rle"))
        if value.get("format", "rle") != "rle" or not isinstance(rle, list):
            raise AnnotationError(f"Label Studio {where}: no rle list of bytes")
        return Region(where, lambda w, h: label_studio_brush(rle, w, h, where))
    if kind in ("polygonlabels", "polygon"):
        points = point_list(value.get("points"), f"Label Studio {where}") * [width / 100.0, height / 100.0]
        if len(points) < 3:
            raise AnnotationError(f"Label Studio {where}: a polygon needs 3 points or more")
        return Region(where, lambda w, h: fill_polygon(points, w, h))
    if kind in ("rectanglelabels", "rectangle"):
        return label_studio_rectangle(value, width, height, where)
    raise AnnotationError(
        f"Label Studio {where}: result type {kind!r} is not read: export brush, polygon or rectangle regions"
    )


def label_studio_rectangle(value: dict[str, Any], width: int, height: int, where: str) -> Region:
    if value.get("rotation", 0):
        raise AnnotationError(f"Label Studio {where}: a rotated rectangle is not read: draw it as a polygon")
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise AnnotationError(f"Label Studio {where}: x, y, width and height must be numbers") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise AnnotationError(f"Label Studio {where}: x, y, width and height must be finite numbers")
    corners = within_reach(np.array([[x, y], [x + w, y + h]]) * [width / 100.0, height / 100.0], where)
    return Region(where, lambda iw, ih: fill_rectangle(corners, iw, ih))


def label_studio_brush(rle: list[int], width: int, height: int, where: str) -> Array:
    """Label Studio's brush RLE (thi.ng rle-pack, as label-studio-converter's ``decode_rle`` reads it) as (H, W)
    booleans: the decoded values are the RGBA layer, row by row; a pixel is defect where its alpha is non-zero.

    Bit stream, most significant bit first: 32 bits value count; 5 bits word size - 1; four 4-bit run-length
    sizes - 1; then records: 1 bit repeat flag, 2 bits choosing a run-length size, that many bits run length - 1,
    then one word repeated (flag 1) or run-length words (flag 0).
    """
    try:
        bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    except (ValueError, OverflowError) as err:
        raise AnnotationError(f"Label Studio {where}: rle is not a list of bytes (0..255)") from err
    values = decode_rle_pack(bits, where, width * height * 4)
    return values.reshape(height, width, 4)[:, :, 3] > 0


class BitReader:
    """Unsigned integers read from a bit array, most significant bit first."""

    def __init__(self, bits: Array, where: str):
        self.bits, self.position, self.where = bits, 0, where

    def read(self, count: int) -> int:
        end = self.position + count
        if end > len(self.bits):
            raise AnnotationError(f"Label Studio {self.where}: rle ends early")
        value = 0
        for bit in self.bits[self.position : end]:
            value = (value << 1) | int(bit)
        self.position = end
        return value


def decode_rle_pack(bits: Array, where: str, expected: int) -> Array:
    """The ``expected`` values of an RGBA layer; a stream stating another count is refused before anything is
    allocated (its first 32 bits could ask for 17 GB)."""
    reader = BitReader(bits, where)
    count = reader.read(32)
    if count != expected:
        raise AnnotationError(
            f"Label Studio {where}: rle holds {count} values, an RGBA layer of the image has {expected} (4 per pixel)"
        )
    word = reader.read(5) + 1
    run_sizes = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, np.uint32)
    i = 0
    while i < count:
        repeat = reader.read(1)
        end = min(count, i + 1 + reader.read(run_sizes[reader.read(2)]))
        if repeat:
            out[i:end] = reader.read(word)
            i = end
        else:
            for k in range(i, end):
                out[k] = reader.read(word)
            i = end
    return out


# --- the pixel rule ------------------------------------------------------------------------------------


def fill_span(row: Array, start: float, stop: float) -> None:
    """Mark the pixels of one row whose column lies in [start, stop]."""
    low, high = max(math.ceil(start - EPS), 0), min(math.floor(stop + EPS), len(row) - 1)
    if low <= high:
        row[low : high + 1] = True


def fill_polygon(points: Array, width: int, height: int) -> Array:
    """(H, W) booleans: pixel (x, y) is True when the point (x, y) is inside the polygon (even-odd rule) or on
    its outline. Scanlines: each row's crossings with the edges (half-open in y) bound its inside spans; then
    the lattice points on each edge (horizontal edges whole) are added."""
    mask = np.zeros((height, width), bool)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    top, bottom = max(math.ceil(y0.min() - EPS), 0), min(math.floor(y0.max() + EPS), height - 1)
    for y in range(top, bottom + 1):
        crossing = ((y0 <= y) & (y < y1)) | ((y1 <= y) & (y < y0))
        xs = np.sort(x0[crossing] + (y - y0[crossing]) * (x1[crossing] - x0[crossing]) / (y1[crossing] - y0[crossing]))
        for start, stop in zip(xs[0::2], xs[1::2], strict=True):
            fill_span(mask[y], start, stop)
    for a, b in zip(points, np.roll(points, -1, axis=0), strict=True):
        mark_edge(mask, a, b)
    return mask


def mark_edge(mask: Array, a: Array, b: Array) -> None:
    """Mark the pixels whose (x, y) lies on the segment a-b."""
    height = mask.shape[0]
    (ax, ay), (bx, by) = a, b
    if abs(ay - by) < EPS:
        y = round(ay)
        if abs(ay - y) < EPS and 0 <= y < height:
            fill_span(mask[y], min(ax, bx), max(ax, bx))
        return
    for y in range(max(math.ceil(min(ay, by) - EPS), 0), min(math.floor(max(ay, by) + EPS), height - 1) + 1):
        x = ax + (y - ay) * (bx - ax) / (by - ay)
        if abs(x - round(x)) < EPS and 0 <= round(x) < mask.shape[1]:
            mask[y, round(x)] = True


def fill_polygons(polygons: list[Array], width: int, height: int) -> Array:
    """The union of :func:`fill_polygon` of each (a COCO segmentation of several parts)."""
    return np.logical_or.reduce([fill_polygon(points, width, height) for points in polygons])


def fill_rectangle(corners: Array, width: int, height: int) -> Array:
    """(H, W) booleans: the pixels (x, y) within the box of two opposite corners, edges included."""
    mask = np.zeros((height, width), bool)
    (xa, ya), (xb, yb) = corners
    top, bottom = max(math.ceil(min(ya, yb) - EPS), 0), min(math.floor(max(ya, yb) + EPS), height - 1)
    for y in range(top, bottom + 1):
        fill_span(mask[y], min(xa, xb), max(xa, xb))
    return mask


def fill_circle(points: Array, width: int, height: int) -> Array:
    """(H, W) booleans: the pixels (x, y) within the circle of centre ``points[0]`` through ``points[1]``."""
    (cx, cy), (px, py) = points
    radius_sq = (px - cx) ** 2 + (py - cy) ** 2
    radius = math.sqrt(radius_sq)
    mask = np.zeros((height, width), bool)
    top, bottom = max(math.ceil(cy - radius - EPS), 0), min(math.floor(cy + radius + EPS), height - 1)
    left, right = max(math.ceil(cx - radius - EPS), 0), min(math.floor(cx + radius + EPS), width - 1)
    if top <= bottom and left <= right:
        ys, xs = np.mgrid[top : bottom + 1, left : right + 1]
        mask[top : bottom + 1, left : right + 1] = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius_sq + EPS
    return mask
