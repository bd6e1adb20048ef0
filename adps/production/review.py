"""The review queue: kept inputs waiting for a person's verdict, and verdicts that feed the next training.

Layout, per category: ``<review_dir>/<category>/<id><ext>`` (the input as it came), ``<id>.heatmap.png``
(image | - | map over image | pixels above the pixel threshold) and ``<id>.json`` (the logged row; written
last, so an item without it is not complete). A verdict moves the image into the incoming folder layout
``prepare`` reads (``normal/``, ``anomalous/``, ``masks/``) as ``reviewed-<id><ext>``: the name tells later
stages (and the registry's version description) that a person judged it.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adps.data.layout import IMAGE_SUFFIXES
from adps.errors import AdpsError
from adps.evaluation.heatmaps import heatmap_panel, save_heatmap
from adps.files import write_atomically, write_text_atomically
from adps.model.network import at_size

logger = logging.getLogger(__name__)
REVIEWED_PREFIX = "reviewed-"  # name prefix of every image a verdict brought into the incoming folder
VERDICTS = ("good", "defect")
LEDGER = "verdicts.csv"
FORMAT_SUFFIX = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "GIF": ".gif",
}


@dataclass(frozen=True)
class IncomingFolders:
    """Where verdicts go: ``data.import_path`` with ``data.folder``'s names (the layout ``prepare`` reads)."""

    root: Path
    normal: str = "normal"
    anomalous: str = "anomalous"
    masks: str = "masks"
    mask_suffix: str = "_mask"
    min_side: int = 32  # validation.min_side: a smaller image would hold its category back


def image_suffix(data: bytes | None, path: Path | None) -> str:
    """The file suffix an input is kept under: its own when it has a known one, else its decoded format's."""
    if path is not None and Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return Path(path).suffix.lower()
    with Image.open(io.BytesIO(data) if data is not None else path) as image:
        return FORMAT_SUFFIX.get(image.format or "", ".png")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


class ReviewQueue:
    """Kept inputs under ``root``; :meth:`add` from the prediction log's writer, the rest from ``adps review``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def add(
        self,
        row: dict[str, Any],
        reason: str,
        data: bytes | None,
        path: Path | None,
        image: np.ndarray,
        anomaly_map: np.ndarray,
        pixel_threshold: float,
        max_bytes: int,
    ) -> str:
        """Keep one input with its heatmap; returns its id, or "" when that would take the queue past ``max_bytes``."""
        content = data if data is not None else Path(path).read_bytes()
        if folder_bytes(self.root) + len(content) > max_bytes:
            return ""
        stamp = row["time"].strftime("%Y%m%d-%H%M%S")
        folder = self.root / safe_category(row["category"])
        folder.mkdir(parents=True, exist_ok=True)
        item_id = base = f"{stamp}-{(row['input_sha256'] or '0' * 12)[:12]}"
        for n in itertools.count(1):  # the same input twice in one second: a second item, never an overwrite
            if not any(folder.glob(f"{item_id}.*")):
                break
            item_id = f"{base}-{n}"
        write_atomically(folder / f"{item_id}{image_suffix(data, path)}", lambda tmp: tmp.write_bytes(content))
        shown = at_size(torch.from_numpy(anomaly_map), image.shape[:2]).numpy()
        caption = f"{row['input_name']} score={row['score']:.3f} ({reason})"
        save_heatmap(folder / f"{item_id}.heatmap.png", heatmap_panel(image, shown, pixel_threshold, None), caption)
        record = {k: v for k, v in row.items() if k not in ("features", "kept")}
        record.update(time=row["time"].isoformat(), reason=reason, id=item_id)
        write_text_atomically(folder / f"{item_id}.json", json.dumps(record, indent=2) + "\n")
        return item_id

    def items(self, category: str | None = None) -> list[dict[str, Any]]:
        """Complete items waiting for a verdict, oldest first, each with its ``image`` and ``heatmap`` paths."""
        if not self.root.is_dir():
            return []
        folders = [self.root / category] if category else sorted(p for p in self.root.iterdir() if p.is_dir())
        found = []
        for record_file in sorted(f for folder in folders if folder.is_dir() for f in folder.glob("*.json")):
            try:
                item = json.loads(record_file.read_text())
                if not isinstance(item, dict) or not {"id", "category", "width", "height"} <= item.keys():
                    raise ValueError("no id, category or size")
            except (ValueError, OSError) as err:
                logger.warning("%s is not a review item (%s): left alone", record_file, err)
                continue
            images = [
                p
                for p in record_file.parent.glob(f"{item['id']}.*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(".heatmap.png")
            ]
            if images:
                found.append(item | {"image": str(images[0]), "heatmap": str(record_file.with_suffix(".heatmap.png"))})
        return found

    def find(self, item_id: str) -> dict[str, Any]:
        matches = [item for item in self.items() if item["id"] == item_id or item["id"].endswith(item_id)]
        if len(matches) != 1:
            what = "no item" if not matches else f"{len(matches)} items"
            shown = "`adps review list` shows them"
            raise AdpsError(f"{what} with id {item_id!r} in the review queue {self.root}: {shown}")
        return matches[0]

    def judge(self, item_id: str, verdict: str, incoming: IncomingFolders, mask: Path | None = None) -> dict[str, Any]:
        """Move one item into ``incoming``: ``good`` to normal/, ``defect`` to anomalous/ (with ``mask``, if any,
        to masks/). The next ``prepare`` imports it: good images train (a seeded share tests), defects test."""
        if verdict not in VERDICTS:
            raise AdpsError(f"verdict must be one of {', '.join(VERDICTS)} (got {verdict!r})")
        item = self.find(item_id)
        if mask is not None and verdict != "defect":
            raise AdpsError(f"a mask marks a defect: give --mask with the verdict defect, not {verdict}")
        image = Path(item["image"])
        if min(item["width"], item["height"]) < incoming.min_side:
            raise AdpsError(
                f"{item['id']} is {item['width']} x {item['height']} px, below validation.min_side "
                f"{incoming.min_side}: the dataset would refuse it; delete {image} instead"
            )
        if mask is not None:
            check_mask(mask, (item["width"], item["height"]))
        folder = incoming.root / safe_category(item["category"])
        name = f"{REVIEWED_PREFIX}{item['id']}{image.suffix}"
        target = folder / (incoming.normal if verdict == "good" else incoming.anomalous) / name
        mask_target = None
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(image, target)
        if mask is not None:
            mask_target = folder / incoming.masks / f"{REVIEWED_PREFIX}{item['id']}{incoming.mask_suffix}{mask.suffix}"
            mask_target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(mask, mask_target)
            except OSError:
                shutil.move(target, image)  # put the image back: no half verdict
                raise
        for leftover in (image.with_name(f"{item['id']}.heatmap.png"), image.with_name(f"{item['id']}.json")):
            leftover.unlink(missing_ok=True)
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "id": item["id"],
            "category": item["category"],
            "verdict": verdict,
            "score": item["score"],
            "flagged": item["is_anomalous"],
            "file": str(target),
            "mask": str(mask_target or ""),
        }
        self.append_ledger(entry)
        return entry

    def append_ledger(self, entry: dict[str, Any]) -> None:
        """``verdicts.csv``: every verdict given, for the record (false alarms confirmed, defects confirmed)."""
        ledger = self.root / LEDGER
        new = not ledger.exists()
        with ledger.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(entry))
            if new:
                writer.writeheader()
            writer.writerow(entry)
            handle.flush()
            os.fsync(handle.fileno())


def check_mask(mask: Path, size: tuple[int, int]) -> None:
    """A mask must pass what dataset validation will check: an image file of the input's own size
    (width, height), binary (a JPEG's grey edges are not) and marking at least one pixel."""
    from adps.data.validation import read_mask_facts

    if mask.suffix.lower() not in IMAGE_SUFFIXES or not mask.is_file():
        raise AdpsError(f"mask {mask}: not an image file of a supported format ({', '.join(sorted(IMAGE_SUFFIXES))})")
    facts = read_mask_facts(mask, tuple(size), True)
    if not facts["mask_decodes"]:
        raise AdpsError(f"mask {mask} cannot be read ({facts['mask_error']}): give a PNG, white where the defect is")
    if not facts["mask_size_matches"]:
        with Image.open(mask) as opened:
            found = opened.size
        sizes = f"{found[0]} x {found[1]} px, the image {size[0]} x {size[1]}"
        raise AdpsError(f"mask {mask} is {sizes}: draw it at the image's size")
    if not facts["mask_binary"]:
        raise AdpsError(f"mask {mask} is not binary (two values; a JPEG's edges are grey): save it as a PNG, 0 and 255")
    if not facts["mask_nonempty"]:
        raise AdpsError(f"mask {mask} marks no pixel: mark the defect, or give the verdict without --mask")


def safe_category(category: str | None) -> str:
    """A category as a folder name: a name with path characters (from a model's thresholds.json) is refused
    into ``unknown``, so nothing is written outside the review folder."""
    name = category or "unknown"
    return name if name not in ("", ".", "..") and "/" not in name and "\\" not in name else "unknown"
