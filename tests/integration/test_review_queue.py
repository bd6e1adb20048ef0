"""Verdicts are all or nothing; one input is one item; ids are unique across categories (real files, real locks).

Items are added as the prediction log's writer adds them (:meth:`ReviewQueue.add`), with a real PNG; no model
is needed to test how a verdict moves them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps.errors import AdpsError
from adps.production.review import JUDGING, LEDGER, REVIEWED_PREFIX, IncomingFolders, ReviewQueue


def png(seed: int, size: int = 64) -> bytes:
    """A PNG image whose content (and so sha256) depends on ``seed``."""
    path = Path(f"/tmp/review-queue-{os.getpid()}-{seed}.png")
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def add(queue: ReviewQueue, data: bytes, category: str = "washer", second: int = 0) -> str:
    """Keep ``data`` as the log's writer keeps a flagged input logged at 10:00:<second>."""
    row = {"time": datetime(2026, 12, 1, 10, 0, second), "input_sha256": hashlib.sha256(data).hexdigest(),
           "category": category, "input_name": "x.png", "score": 0.9, "is_anomalous": True,
           "width": 64, "height": 64}  # fmt: skip
    image, anomaly_map = np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.float32)
    return queue.add(row, "flagged", data, None, image, anomaly_map, 0.5, 2**30)


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def ledger_rows(queue: ReviewQueue) -> list[dict[str, str]]:
    path = queue.root / LEDGER
    return list(csv.DictReader(path.open(newline=""))) if path.is_file() else []


@contextlib.contextmanager
def read_only(*folders: Path) -> Iterator[None]:
    """Folders nobody can create, rename or delete files in. chmod does not stop root (tests may run as root in
    a container): there the folders are made immutable (``chattr +i``, which binds root too; needs ext4, xfs or
    btrfs and CAP_LINUX_IMMUTABLE, else the case is skipped)."""
    as_root = os.geteuid() == 0
    done = []
    try:
        for folder in folders:
            if as_root:
                if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
                    pytest.skip("running as root and chattr +i is not available here: chmod cannot deny root")
            else:
                folder.chmod(0o555)
            done.append(folder)
        yield
    finally:
        for folder in done:
            if as_root:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
            else:
                folder.chmod(0o755)


@contextlib.contextmanager
def folder_in_the_way(path: Path) -> Iterator[None]:
    """A folder where a file must go: fails for root and anyone else alike."""
    path.mkdir()
    try:
        yield
    finally:
        path.rmdir()


@pytest.fixture
def queue(tmp_path) -> ReviewQueue:
    return ReviewQueue(tmp_path / "review")


@pytest.mark.parametrize("fault", ["read-only queue", "folder in the ledger's way"])
def test_a_verdict_that_fails_leaves_nothing_behind_and_the_next_one_works(queue, tmp_path, fault):
    """The issue's example: a read-only review queue. `good` fails with a clear message; nothing reaches the
    incoming folder, no ledger row, the item still waits; once writable, `defect` places the image once."""
    data = png(1)
    item_id = add(queue, data)
    incoming = IncomingFolders(tmp_path / "incoming")
    queued = {p: p.read_bytes() for p in files(queue.root / "washer")}
    fails = (
        read_only(queue.root, queue.root / "washer")
        if fault == "read-only queue"
        else folder_in_the_way(queue.root / LEDGER)
    )
    with fails, pytest.raises(AdpsError, match=rf"verdict good on {item_id} not given|cannot read the verdict ledger"):
        queue.judge(item_id, "good", incoming)
    assert files(tmp_path / "incoming") == []  # no copy, no temp file
    assert ledger_rows(queue) == [] and not (queue.root / LEDGER).exists()
    assert [i["id"] for i in queue.items()] == [item_id]
    assert {p: p.read_bytes() for p in files(queue.root / "washer")} == queued  # the item exactly as it was

    entry = queue.judge(item_id, "defect", incoming)
    placed = files(tmp_path / "incoming")
    assert placed == [tmp_path / f"incoming/washer/anomalous/{REVIEWED_PREFIX}{item_id}.png"]
    assert placed[0].read_bytes() == data and entry["file"] == str(placed[0])
    assert [(r["id"], r["verdict"], r["input_sha256"]) for r in ledger_rows(queue)] == [
        (item_id, "defect", hashlib.sha256(data).hexdigest())
    ]
    assert queue.items() == [] and files(queue.root / "washer") == []  # image, heatmap and record gone
    with pytest.raises(AdpsError, match=rf"{item_id} was already judged defect at .*A verdict is given once"):
        queue.judge(item_id, "good", incoming)
    assert files(tmp_path / "incoming") == placed and len(ledger_rows(queue)) == 1


def test_the_read_only_queue_fails_before_the_image_is_taken_out(queue, tmp_path):
    """A read-only category folder alone (the ledger's folder writable): the copy staged in the incoming folder
    and the new ledger are removed again, the record stays where it was."""
    item_id = add(queue, png(2))
    incoming = IncomingFolders(tmp_path / "incoming")
    with read_only(queue.root / "washer"), pytest.raises(AdpsError, match=r"Nothing moved: .* is still in the review"):
        queue.judge(item_id, "good", incoming)
    assert files(tmp_path / "incoming") == [] and files(queue.root) == sorted(
        [
            queue.root / ".queue.lock",
            *(queue.root / "washer" / f"{item_id}{s}" for s in (".heatmap.png", ".json", ".png")),
        ]
    )


def test_two_verdicts_on_one_item_at_once_one_is_given_the_other_refused(queue, tmp_path):
    """Two inspectors (threads here; the lock is a file lock, so processes and REST workers alike) judge one
    item at the same moment: one verdict, one image, one ledger row; the other is told it was judged."""
    item_id = add(queue, png(3))
    incoming = IncomingFolders(tmp_path / "incoming")
    start, outcomes = threading.Barrier(2), {}

    def judge(verdict: str) -> None:
        start.wait()
        try:
            outcomes[verdict] = queue.judge(item_id, verdict, incoming)["verdict"]
        except AdpsError as err:
            outcomes[verdict] = str(err)

    threads = [threading.Thread(target=judge, args=(v,)) for v in ("good", "defect")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    given = [v for v, outcome in outcomes.items() if outcome == v]
    refused = [outcome for v, outcome in outcomes.items() if outcome != v]
    assert len(given) == 1 and len(refused) == 1 and f"{item_id} was already judged {given[0]}" in refused[0]
    assert len(files(tmp_path / "incoming")) == 1 and len(ledger_rows(queue)) == 1


def test_one_input_is_one_item_and_ids_are_unique_across_categories(queue, tmp_path):
    """The same content again (same second, or later) is not kept twice, waiting or judged; the same content
    in another category is another item, with an id no category holds."""
    data, other = png(4), png(5)
    first = add(queue, data)
    sha = hashlib.sha256(data).hexdigest()
    assert first == f"20261201-100000-{sha[:12]}"
    assert add(queue, data) == first and add(queue, data, second=30) == first  # waiting: the same item
    assert add(queue, other) != first and len(queue.items("washer")) == 2
    elsewhere = add(queue, data, category="fabric")  # same time and content, another category: a new id
    assert elsewhere == first + "-1" and len(queue.items()) == 3
    queue.judge(first, "good", IncomingFolders(tmp_path / "incoming"))
    assert add(queue, data, second=59) == first  # judged: still the same input, not queued again
    assert len(queue.items("washer")) == 1 and not list((queue.root / "washer").glob(f"{first}*"))
    assert add(queue, png(6), category="fabric") not in (first, elsewhere)
    ids = [i["id"] for i in queue.items()] + [r["id"] for r in ledger_rows(queue)]
    assert len(ids) == len(set(ids)) == 4


def test_a_verdict_killed_half_way_is_undone_or_finished_by_the_next_verdict(queue, tmp_path):
    """What ``kill -9`` leaves between taking an item out of the queue and recording it: not recorded ->
    undone (the item waits again, the copy leaves the incoming folder); recorded -> the queue's leftovers go."""
    incoming = IncomingFolders(tmp_path / "incoming")
    undone, finished, other = add(queue, png(7)), add(queue, png(8)), add(queue, png(9))
    folder = queue.root / "washer"
    # killed before the ledger: record renamed out of the queue, the copy already placed, a temp beside it
    (folder / f"{undone}.json").rename(folder / f".{undone}{JUDGING}")
    normal = incoming.root / "washer/normal"
    normal.mkdir(parents=True)
    (normal / f"{REVIEWED_PREFIX}{undone}.png").write_bytes((folder / f"{undone}.png").read_bytes())
    (normal / f".{REVIEWED_PREFIX}{undone}.png.x1.tmp").write_bytes(b"partial")
    assert undone in [i["id"] for i in queue.items()]  # still listed: it is still waiting
    # killed after the ledger: the verdict is given, the queue's files stayed
    queue.judge(finished, "good", incoming)
    for name in (f"{finished}.png", f".{finished}{JUDGING}"):
        (folder / name).write_bytes(b"left over")

    queue.judge(other, "defect", incoming)  # any verdict recovers first
    assert sorted(i["id"] for i in queue.items()) == [undone]
    assert sorted(p.name for p in files(incoming.root)) == sorted(
        [f"{REVIEWED_PREFIX}{finished}.png", f"{REVIEWED_PREFIX}{other}.png"]
    )
    assert not list(folder.glob(f"*{finished}*"))
    assert json.loads((folder / f"{undone}.json").read_text())["id"] == undone
    queue.judge(undone, "good", incoming)
    assert [r["id"] for r in ledger_rows(queue)] == [finished, other, undone]


def test_an_image_left_in_the_incoming_folder_by_an_older_half_verdict_is_named(queue, tmp_path):
    """The issue's state: an older version copied the image into normal/ and then failed. `defect` would label
    it both ways: refused, naming the file."""
    item_id = add(queue, png(10))
    incoming = IncomingFolders(tmp_path / "incoming")
    left = incoming.root / f"washer/normal/{REVIEWED_PREFIX}{item_id}.png"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"an earlier copy")
    with pytest.raises(AdpsError, match=rf"{left} is already in the incoming folder .*delete it if the verdict defect"):
        queue.judge(item_id, "defect", incoming)
    assert files(incoming.root) == [left] and [i["id"] for i in queue.items()] == [item_id]


def test_an_older_ledger_gains_the_content_column_and_keeps_its_rows(queue, tmp_path):
    """verdicts.csv of an older version (no input_sha256 column): its rows are kept, and its judged inputs are
    still recognised by the hash part of their ids."""
    data = png(11)
    sha = hashlib.sha256(data).hexdigest()
    queue.root.mkdir()
    old = (
        "time,id,category,verdict,score,flagged,file,mask\r\n"
        f"2026-11-30T09:00:00+00:00,20261130-090000-{sha[:12]},washer,good,0.9,True,x.png,\r\n"
    )
    (queue.root / LEDGER).write_text(old, newline="")
    assert add(queue, data) == f"20261130-090000-{sha[:12]}"  # judged before: not queued again
    item_id = add(queue, png(12))
    queue.judge(item_id, "good", IncomingFolders(tmp_path / "incoming"))
    rows = ledger_rows(queue)
    assert [r["id"] for r in rows] == [f"20261130-090000-{sha[:12]}", item_id]
    assert rows[0]["input_sha256"] == "" and rows[0]["file"] == "x.png" and len(rows[1]["input_sha256"]) == 64
