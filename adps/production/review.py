"""The review queue: kept inputs waiting for a person's verdict, and verdicts that feed the next training.

Layout, per category: ``<review_dir>/<category>/<id><ext>`` (the input as it came), ``<id>.heatmap.png``
(image | - | map over image | pixels above the pixel threshold) and ``<id>.json`` (the logged row; written
last, so an item without it is not complete). A verdict moves the image into the incoming folder layout
``prepare`` reads (``normal/``, ``anomalous/``, ``masks/``) as ``reviewed-<id><ext>``: the name tells later
stages (and the registry's version description) that a person judged it.

A verdict is all or nothing: the copies are staged as temp files in their target folders and the new
ledger (``verdicts.csv``) beside the old one, the item leaves the queue by one rename of its record to
``.<id>.judging``, the copies are renamed into place and the ledger is swapped in last (the commit). A
failure at any step undoes the steps before it; a process killed half-way is finished or undone by the
next verdict (:meth:`ReviewQueue.recover`: the ledger says whether it committed). Every change to the
queue holds ``.queue.lock``, so two servers' writers and two people judging never interleave.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator
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
from adps.files import (
    path_text,
    remove_stale_temps,
    stage_file,
    waiting_lock,
    write_atomically,
    write_text_atomically,
)
from adps.model.network import at_size

logger = logging.getLogger(__name__)
REVIEWED_PREFIX = "reviewed-"  # name prefix of every image a verdict brought into the incoming folder
VERDICTS = ("good", "defect")
LEDGER = "verdicts.csv"
LEDGER_FIELDS = ("time", "id", "category", "verdict", "score", "flagged", "file", "mask", "input_sha256")
LOCK = ".queue.lock"  # held by every change to the queue (add, judge, recover)
JUDGING = ".judging"  # an item's record is renamed to .<id>.judging while its verdict is given
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
    mask_threshold: float | None = None  # data.mask_threshold: the rule `prepare` reads a mask by

    def placed(self, category: str, item_id: str, temps: bool = False) -> list[Path]:
        """Every file a verdict on ``item_id`` may have put in ``category``'s incoming folders; with ``temps``,
        the temp copies a killed verdict left there instead."""
        folder = self.root / category
        found = []
        for sub, stem in ((self.normal, ""), (self.anomalous, ""), (self.masks, self.mask_suffix)):
            name = f"{REVIEWED_PREFIX}{item_id}{stem}"
            found += (folder / sub).glob(f".{name}.*.tmp" if temps else f"{name}.*")
        return [p for p in found if p.is_file()]


@dataclass(frozen=True)
class Verdict:
    """One verdict, planned: the item, where its image (and mask) go, and its ledger row."""

    item: dict[str, Any]
    image: Path
    target: Path
    mask: Path | None
    mask_target: Path | None
    entry: dict[str, Any]

    @property
    def record(self) -> Path:
        return self.image.with_name(f"{self.item['id']}.json")

    @property
    def marker(self) -> Path:
        return self.image.with_name(f".{self.item['id']}{JUDGING}")

    def copies(self) -> list[tuple[Path, Path]]:
        """(source, target) of each file the verdict places."""
        pairs = [(self.image, self.target)]
        return pairs + ([(self.mask, self.mask_target)] if self.mask and self.mask_target else [])


def write_item_files(folder: Path, item_id: str, row: dict[str, Any], reason: str, panel: np.ndarray) -> None:
    """An item's heatmap, then its record (the logged row, the reason, the id): written last, it completes it."""
    save_heatmap(folder / f"{item_id}.heatmap.png", panel, f"{row['input_name']} score={row['score']:.3f} ({reason})")
    record = {k: v for k, v in row.items() if k not in ("features", "kept")}
    record.update(time=row["time"].isoformat(), reason=reason, id=item_id)
    write_text_atomically(folder / f"{item_id}.json", json.dumps(record, indent=2) + "\n")


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

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the queue's lock: other processes and threads changing the queue wait."""
        with waiting_lock(self.root / LOCK):
            yield

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
        """Keep one input with its heatmap; returns its id, or "" when that would take the queue past ``max_bytes``.

        An input whose content (``input_sha256``) is already waiting or was already judged in its category is
        not kept again: the existing item's id is returned (a camera that sends one frame twice, a client that
        retries a request, a kept image sent again after its verdict).
        """
        content = data if data is not None else Path(path).read_bytes()
        category = safe_category(row["category"])
        with self.locked():
            if known := self.known_id(row.get("input_sha256"), category):
                return known
            if folder_bytes(self.root) + len(content) > max_bytes:
                return ""
            folder = self.root / category
            folder.mkdir(parents=True, exist_ok=True)
            item_id = self.new_id(row)
            kept = folder / f"{item_id}{image_suffix(data, path)}"
            try:
                write_atomically(kept, lambda tmp: tmp.write_bytes(content))
                shown = at_size(torch.from_numpy(anomaly_map), image.shape[:2]).numpy()
                write_item_files(folder, item_id, row, reason, heatmap_panel(image, shown, pixel_threshold, None))
            except BaseException:  # no half item: its record is written last, and the rest goes with it
                for written in (kept, folder / f"{item_id}.heatmap.png"):
                    written.unlink(missing_ok=True)
                raise
        return item_id

    def new_id(self, row: dict[str, Any]) -> str:
        """``<time>-<first 12 hex of the content hash>``, with ``-<n>`` when that id is taken in any category
        (waiting, being judged, or in the ledger): ids are unique across the whole queue."""
        stamp = row["time"].strftime("%Y%m%d-%H%M%S")
        item_id = base = f"{stamp}-{(row.get('input_sha256') or '0' * 12)[:12]}"
        judged = {entry["id"] for entry in self.ledger(strict=False)}
        for n in itertools.count(1):
            taken = any(self.root.glob(f"*/{item_id}.*")) or any(self.root.glob(f"*/.{item_id}{JUDGING}"))
            if not taken and item_id not in judged:
                return item_id
            item_id = f"{base}-{n}"
        raise AssertionError("unreachable")

    def known_id(self, sha: str | None, category: str) -> str:
        """The id of an item of ``category`` with this content: waiting (or being judged), else judged; "" if none."""
        if not sha:
            return ""
        folder = self.root / category
        records = [*folder.glob(f"*-{sha[:12]}*.json"), *folder.glob(f".*-{sha[:12]}*{JUDGING}")]
        for record_file in sorted(records):
            record = read_record(record_file)
            if record and record.get("input_sha256") == sha:
                return str(record["id"])
        entries = self.ledger(strict=False)
        return next((e["id"] for e in entries if safe_category(e["category"]) == category and same_input(e, sha)), "")

    def items(self, category: str | None = None) -> list[dict[str, Any]]:
        """Complete items waiting for a verdict, oldest first, each with its ``image`` and ``heatmap`` paths.

        An item whose verdict a killed process left half-given (``.<id>.judging``, not in the ledger) is
        listed too: it is still waiting, and the next verdict puts it back first.
        """
        if not self.root.is_dir():
            return []
        folders = [self.root / category] if category else sorted(p for p in self.root.iterdir() if p.is_dir())
        records = sorted(f for folder in folders if folder.is_dir() for f in folder.glob("*.json"))
        markers = [f for folder in folders if folder.is_dir() for f in folder.glob(f".*{JUDGING}")]
        judged = {entry["id"] for entry in self.ledger(strict=False)} if markers else set()
        found = []
        for record_file in records + sorted(markers):
            item = read_record(record_file, warn=True)
            if item is None or (record_file in markers and item["id"] in judged):
                continue
            images = [
                p
                for p in record_file.parent.glob(f"{item['id']}.*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(".heatmap.png")
            ]
            if images:
                heatmap = record_file.parent / f"{item['id']}.heatmap.png"
                found.append(item | {"image": str(images[0]), "heatmap": str(heatmap)})
        return sorted(found, key=lambda item: (item["id"], item["image"]))

    def find(self, item_id: str) -> dict[str, Any]:
        matches = [item for item in self.items() if item["id"] == item_id or item["id"].endswith(item_id)]
        if len(matches) != 1:
            what = "no item" if not matches else f"{len(matches)} items"
            shown = "`adps review list` shows them"
            raise AdpsError(f"{what} with id {item_id!r} in the review queue {self.root}: {shown}")
        return matches[0]

    def judge(self, item_id: str, verdict: str, incoming: IncomingFolders, mask: Path | None = None) -> dict[str, Any]:
        """Move one item into ``incoming``: ``good`` to normal/, ``defect`` to anomalous/ (with ``mask``, if any,
        to masks/), and record it in the ledger, all or nothing. The next ``prepare`` imports it: good images
        train (a seeded share tests), defects test. An item already judged is refused."""
        if verdict not in VERDICTS:
            raise AdpsError(f"verdict must be one of {', '.join(VERDICTS)} (got {verdict!r})")
        if mask is not None and verdict != "defect":
            raise AdpsError(f"a mask marks a defect: give --mask with the verdict defect, not {verdict}")
        try:
            with self.locked():
                self.recover(incoming)
                planned = self.plan(item_id, verdict, incoming, mask)
                self.give(planned)
        except OSError as err:  # the lock or a half-verdict's recovery could not be written
            raise AdpsError(
                f"verdict {verdict} on {item_id} not given: {describe(err)}. Make the review queue {self.root} "
                f"and {incoming.root} writable and run it again; nothing was moved."
            ) from err
        return planned.entry

    def plan(self, item_id: str, verdict: str, incoming: IncomingFolders, mask: Path | None) -> Verdict:
        """Check everything a verdict needs before anything moves; where its files go, and its ledger row."""
        self.refuse_judged(item_id)
        item = self.find(item_id)
        image = Path(item["image"])
        if min(item["width"], item["height"]) < incoming.min_side:
            raise AdpsError(
                f"{item['id']} is {item['width']} x {item['height']} px, below validation.min_side "
                f"{incoming.min_side}: the dataset would refuse it; delete {image} instead"
            )
        if mask is not None:
            check_mask(mask, (item["width"], item["height"]), incoming.mask_threshold)
        category = safe_category(item["category"])
        folder = incoming.root / category
        target = folder / (incoming.normal if verdict == "good" else incoming.anomalous)
        target /= f"{REVIEWED_PREFIX}{item['id']}{image.suffix}"
        mask_target = None
        if mask is not None:
            mask_target = folder / incoming.masks / f"{REVIEWED_PREFIX}{item['id']}{incoming.mask_suffix}{mask.suffix}"
        refuse_left_copies(incoming, category, item["id"], verdict, {target: image, mask_target: mask})
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "id": item["id"],
            "category": item["category"],
            "verdict": verdict,
            "score": item["score"],
            "flagged": item["is_anomalous"],
            "file": str(target),
            "mask": str(mask_target or ""),
            "input_sha256": item.get("input_sha256") or "",
        }
        return Verdict(item, image, target, mask, mask_target, entry)

    def give(self, verdict: Verdict) -> None:
        """Stage, take out of the queue, place, commit the ledger; on a failure undo what was done, in reverse."""
        staged: list[tuple[Path, Path]] = []
        placed: list[Path] = []
        out_of_queue = False
        try:
            for source, target in verdict.copies():
                if not (target.is_file() and same_bytes(source, target)):  # a copy already in place stays
                    copy = stage_file(target, lambda tmp, s=source: shutil.copyfile(s, tmp), sync=True)
                    staged.append((copy, target))
            staged.append((self.stage_ledger(verdict.entry), self.root / LEDGER))
            os.rename(verdict.record, verdict.marker)
            out_of_queue = True
            for tmp, target in staged[:-1]:
                os.replace(tmp, target)
                placed.append(target)
            os.replace(*staged[-1])  # the commit: the verdict is given once the ledger holds it
        except BaseException as err:
            undo(staged, placed, verdict if out_of_queue else None)
            if not isinstance(err, OSError):
                raise
            item = verdict.item["id"]
            raise AdpsError(
                f"verdict {verdict.entry['verdict']} on {item} not given: {describe(err)}. Nothing moved: {item} "
                f"is still in the review queue, no file of it is in {verdict.target.parent.parent}, and "
                f"{self.root / LEDGER} is as it was. Make the review queue {self.root} and the incoming folder "
                "writable (or move what is in the way) and run it again."
            ) from err
        for leftover in (verdict.image, verdict.image.with_name(f"{verdict.item['id']}.heatmap.png"), verdict.marker):
            try:
                leftover.unlink(missing_ok=True)
            except OSError as err:  # the verdict is given; a leftover is not listed again (no record)
                logger.warning("verdict on %s given, but %s stays: %s", verdict.item["id"], leftover, err)

    def refuse_judged(self, item_id: str) -> None:
        """An id the ledger holds and the queue does not: judged before (by this person, or another at once)."""
        judged = [e for e in self.ledger() if e["id"] == item_id or e["id"].endswith(item_id)]
        if judged and not any(i["id"] == e["id"] for e in judged for i in self.items()):
            first = judged[0]
            raise AdpsError(
                f"{first['id']} was already judged {first['verdict']} at {first['time']} ({self.root / LEDGER}); "
                f"its image is {first['file']}. A verdict is given once: to change it, move that file yourself."
            )

    def recover(self, incoming: IncomingFolders) -> None:
        """Finish or undo the verdicts a killed process left half-given (their ``.<id>.judging`` record):
        committed (in the ledger) -> remove what stayed in the queue; not committed -> remove what reached
        the incoming folder and put the record back."""
        markers = sorted(self.root.glob(f"*/.*{JUDGING}"))
        if not markers:
            return
        judged = {entry["id"] for entry in self.ledger()}
        for marker in markers:
            item_id, folder = marker.name[1 : -len(JUDGING)], marker.parent
            if item_id in judged:
                for leftover in [*folder.glob(f"{item_id}.*"), marker]:
                    leftover.unlink(missing_ok=True)
                continue
            for placed in incoming.placed(folder.name, item_id) + incoming.placed(folder.name, item_id, temps=True):
                placed.unlink()
            os.rename(marker, folder / f"{item_id}.json")
            logger.warning("%s: a verdict interrupted before it was recorded was undone; the item waits again", item_id)
        remove_stale_temps(self.root / LEDGER)

    def ledger(self, strict: bool = True) -> list[dict[str, str]]:
        """``verdicts.csv``'s rows (none when there is no ledger yet). One that cannot be read stops a verdict
        (``strict``); the log's writer keeps inputs anyway, unchecked against the judged ones (a warning)."""
        path = self.root / LEDGER
        if not path.exists():
            return []
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                return [row for row in csv.DictReader(handle) if row.get("id")]
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            message = f"cannot read the verdict ledger {path} ({err}): restore it or move it away"
            if strict:
                raise AdpsError(message) from err
            logger.warning("%s; inputs are kept without checking what was judged", message)
            return []

    def stage_ledger(self, entry: dict[str, Any]) -> Path:
        """The ledger with ``entry`` appended, in a temp file beside it (the old rows byte for byte; a ledger
        of an older version without some column is rewritten once with it)."""
        path = self.root / LEDGER
        rows = self.ledger()
        old_fields = list(rows[0]) if rows else []
        if path.is_file() and old_fields == list(LEDGER_FIELDS):
            old = path.read_bytes()
            text = old + (b"" if old.endswith(b"\n") else b"\r\n") + csv_text([entry], header=False)
        else:
            text = csv_text([*rows, entry], header=True)
        return stage_file(path, lambda tmp: tmp.write_bytes(text), sync=True)


def refuse_left_copies(
    incoming: IncomingFolders, category: str, item_id: str, verdict: str, sources: dict[Path | None, Path | None]
) -> None:
    """Nothing of ``item_id`` may be in the incoming folder already, but an identical copy at its own target (an
    older version's half-verdict: the image must never be labelled both ways). A killed verdict's temp copies
    are removed: they were never data."""
    for stale in incoming.placed(category, item_id, temps=True):
        stale.unlink()
    for other in incoming.placed(category, item_id):
        source = sources.get(other)
        if source is None or not same_bytes(source, other):
            raise AdpsError(
                f"{other} is already in the incoming folder (left by an earlier verdict on {item_id}): "
                f"delete it if the verdict {verdict} is right, then run it again; nothing was moved."
            )


def csv_text(rows: list[dict[str, Any]], header: bool) -> bytes:
    """Ledger rows as CSV bytes (UTF-8; a file name that is not UTF-8 is shown escaped)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LEDGER_FIELDS), extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8", "backslashreplace")


def undo(staged: list[tuple[Path, Path]], placed: list[Path], taken_out: Verdict | None) -> None:
    """Reverse a verdict's steps: placed copies removed, temps removed, the record back in the queue."""
    for path in [*placed, *(tmp for tmp, _ in staged)]:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if taken_out is not None:
        try:
            os.rename(taken_out.marker, taken_out.record)
        except OSError as err:  # the next verdict's recovery puts it back
            logger.warning("%s stays as %s until the next verdict: %s", taken_out.record, taken_out.marker, err)


def read_record(path: Path, warn: bool = False) -> dict[str, Any] | None:
    """An item's record (``<id>.json``), or None when it is not one."""
    try:
        item = json.loads(path.read_text())
        if not isinstance(item, dict) or not {"id", "category", "width", "height"} <= item.keys():
            raise ValueError("no id, category or size")
    except (ValueError, OSError) as err:
        if warn:
            logger.warning("%s is not a review item (%s): left alone", path, err)
        return None
    return item


def same_input(entry: dict[str, str], sha: str) -> bool:
    """Whether a ledger row is of the input with content hash ``sha`` (older rows: by the id's hash part)."""
    if entry.get("input_sha256"):
        return entry["input_sha256"] == sha
    parts = entry["id"].split("-")
    return len(parts) >= 3 and parts[2] == sha[:12]


def same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def describe(err: OSError) -> str:
    """An OS error as its reason and file ('Permission denied: data/review/washer/x.json'); a temp file as
    the folder it was to be written in."""
    if not err.filename:
        return str(err.strerror or err)
    path = Path(os.fsdecode(err.filename))
    where = f"writing in {path.parent}" if path.name.startswith(".") and path.name.endswith(".tmp") else str(path)
    return f"{err.strerror or err}: {where}"


def check_mask(mask: Path, size: tuple[int, int], threshold: float | None = None) -> None:
    """A mask must pass what ``prepare`` and dataset validation will do with it: an image file of the input's own
    size (width, height), read by the one mask rule (``data.mask_threshold``: null = two-level, a JPEG's grey
    edges are not; t = defect where value > t), marking at least one pixel."""
    from adps.data.images import special_kind
    from adps.data.validation import read_mask_facts

    name = path_text(mask)
    if kind := special_kind(mask):
        raise AdpsError(f"mask {name} is {kind}, not a regular file: give a PNG, white where the defect is")
    if mask.suffix.lower() not in IMAGE_SUFFIXES or not mask.is_file():
        raise AdpsError(f"mask {name}: not an image file of a supported format ({', '.join(sorted(IMAGE_SUFFIXES))})")
    facts = read_mask_facts(mask, tuple(size), True, threshold)
    if not facts["mask_decodes"]:
        raise AdpsError(f"mask {name} cannot be read ({facts['mask_error']}): give a PNG, white where the defect is")
    if not facts["mask_size_matches"]:
        with Image.open(mask) as opened:
            found = opened.size
        sizes = f"{found[0]} x {found[1]} px, the image {size[0]} x {size[1]}"
        raise AdpsError(f"mask {name} is {sizes}: draw it at the image's size")
    if not facts["mask_binary"]:
        raise AdpsError(f"mask {name} is not binary: it is {facts['mask_values']}")
    if not facts["mask_nonempty"]:
        rule = "no pixel" if threshold is None else f"no pixel above data.mask_threshold ({threshold:g})"
        raise AdpsError(f"mask {name} marks {rule}: mark the defect, or give the verdict without --mask")


def safe_category(category: str | None) -> str:
    """A category as a folder name: a name with path characters (from a model's thresholds.json) is refused
    into ``unknown``, so nothing is written outside the review folder."""
    name = category or "unknown"
    return name if name not in ("", ".", "..") and "/" not in name and "\\" not in name else "unknown"
