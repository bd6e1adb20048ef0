"""The prediction log: one row per prediction of ``adps predict`` and of the served model.

A prediction only puts its row on a queue; a background thread writes the rows to the store (any
SQLAlchemy URL: SQLite in the project by default, PostgreSQL for many servers) in batches, and keeps
copies of flagged inputs for review (:mod:`adps.production.review`). A store that is down or slow
never delays or fails a prediction: rows it cannot take, or that find the queue full, are counted as
lost and logged, and the writer tries the store again with the next rows.

Rows are isolated from each other: every text is made storable when the row is made (a file name's
bytes, a NUL or a control character a client sent, a value longer than its column), and a batch the
store refuses for any reason but being unreachable is written again row by row, so only a row the
store itself refuses is lost, counted alone with why.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from adps import paths
from adps.config import Params, find_params, load_params
from adps.files import open_regular, path_text
from adps.production.drift import input_statistics
from adps.production.review import ReviewQueue

logger = logging.getLogger(__name__)
LOG_ENV, REVIEW_ENV = "ADPS_PREDICTION_LOG", "ADPS_REVIEW_DIR"
OFF = ("", "off", "none", "null")
BATCH_ROWS = 256  # rows written in one transaction
WARN_EVERY_S = 30.0  # a store that stays down is reported at most this often
FLUSH_TIMEOUT_S = 5.0  # the most `adps predict` (or a process exiting) waits for the store at the end

metadata = sa.MetaData()
predictions_table = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.DateTime, nullable=False, index=True),  # UTC
    sa.Column("source", sa.String(16), nullable=False),  # predict | serve
    sa.Column("model", sa.Text, nullable=False),  # the model folder or registry URI, or the served model's name
    sa.Column("psm_sha256", sa.String(64), index=True),
    sa.Column("category", sa.String(128), index=True),
    sa.Column("input_name", sa.Text, nullable=False),
    sa.Column("input_sha256", sa.String(64)),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("score", sa.Float),
    sa.Column("is_anomalous", sa.Boolean),
    sa.Column("threshold", sa.Float),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("brightness", sa.Float),
    sa.Column("contrast", sa.Float),
    sa.Column("sharpness", sa.Float),
    sa.Column("features", sa.LargeBinary),  # float16 pooled teacher features (torch engine only)
    sa.Column("kept", sa.Text, nullable=False, default=""),  # review-queue item id when a copy was kept
)


COLUMNS = tuple(c.name for c in predictions_table.columns if c.name != "id")
MAX_TEXT = 4096  # characters kept of a Text column (a client's path of a megabyte is not a row)
TEXT_LIMITS = {  # every text column and the most characters it takes
    c.name: c.type.length or MAX_TEXT for c in predictions_table.columns if isinstance(c.type, sa.String)
}
FLOAT_COLUMNS = tuple(c.name for c in predictions_table.columns if isinstance(c.type, sa.Float))
UNREACHABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, sa.exc.DisconnectionError)


def storable_text(value: Any, limit: int) -> str | None:
    """A value as text any store accepts: printable (:func:`adps.files.path_text` escapes NUL, control
    characters and a file name's non-UTF-8 bytes) and at most ``limit`` characters."""
    if value is None:
        return None
    text = path_text(value if isinstance(value, str) else str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every text storable and every float a number or None (never NaN)."""
    clean = dict(row)
    for name, limit in TEXT_LIMITS.items():
        clean[name] = storable_text(row.get(name), limit)
    for name in FLOAT_COLUMNS:
        value = row.get(name)
        clean[name] = float(value) if value is not None and math.isfinite(float(value)) else None
    for name in ("width", "height"):
        clean[name] = None if row.get(name) is None else int(row[name])
    return clean


@dataclass(frozen=True)
class LogSettings:
    """Where predictions go and which inputs are kept (``production.*`` params, or the environment)."""

    url: str | None
    review_dir: Path | None
    keep_flagged: bool = True
    keep_passed_fraction: float = 0.0
    keep_max_bytes: int = 0
    max_pending: int = 10000


def log_settings(params: Params) -> LogSettings:
    """The project's settings; ``ADPS_PREDICTION_LOG`` (a URL, or ``off``) and ``ADPS_REVIEW_DIR`` override."""
    prod = params.production
    url = os.environ.get(LOG_ENV, prod.log or "").strip()
    review = params.root / (os.environ.get(REVIEW_ENV) or prod.review_dir)  # relative: to the project root
    return LogSettings(
        url=None if url.lower() in OFF else paths.sqlalchemy_url(url, params.root),
        review_dir=Path(review),
        keep_flagged=prod.keep_flagged,
        keep_passed_fraction=prod.keep_passed_fraction,
        keep_max_bytes=int(prod.keep_max_mb * 2**20),
        max_pending=prod.max_pending,
    )


def params_where_served() -> Params | None:
    """The params of the project a served model runs in (params.yaml found from the working directory), or None."""
    found = find_params()
    return load_params(found) if found is not None else None


def settings_where_served() -> LogSettings:
    """A served model's settings: the project's params.yaml found from the working directory, or the
    environment alone (no project: nothing is logged unless ``ADPS_PREDICTION_LOG`` is set)."""
    params = params_where_served()
    if params is not None:
        return log_settings(params)
    url = os.environ.get(LOG_ENV, "").strip()
    review = os.environ.get(REVIEW_ENV)
    return LogSettings(None if url.lower() in OFF else paths.sqlalchemy_url(url, Path.cwd()), review and Path(review))


def open_store(url: str) -> sa.Engine:
    """An engine on the log's database, its table created (several processes may race to create it)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 10})
        sa.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA journal_mode=WAL"))
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    for attempt in range(3):
        try:
            metadata.create_all(engine)
            break
        except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.2)
    return engine


def utc_now() -> datetime:
    """The time rows are stamped with: UTC, without a zone (the same in every database)."""
    return datetime.now(UTC).replace(tzinfo=None)


def content_sha256(data: bytes | None, path: Path | None) -> str | None:
    """sha256 of the input's bytes; None for a path that is not a regular file (a FIFO is never opened: it
    would block) or cannot be read."""
    if data is not None:
        return hashlib.sha256(data).hexdigest()
    if path is None:
        return None
    digest = hashlib.sha256()
    try:
        with open_regular(path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, ValueError):
        return None
    return digest.hexdigest()


def regular_bytes(path: Path | None) -> bytes | None:
    """The bytes of a regular file, or None (not one, or unreadable)."""
    try:
        with open_regular(path) as handle:
            return handle.read()
    except (OSError, TypeError, ValueError):
        return None


def sampled(sha256: str | None, fraction: float) -> bool:
    """Whether a passed input is in the kept share: decided by its content hash, so reproducible."""
    return sha256 is not None and int(sha256[:8], 16) / 16**8 < fraction


@dataclass
class Pending:
    """A row on its way to the store, and what the review queue needs when the input is kept."""

    row: dict[str, Any]
    keep: str = ""  # "flagged" | "sampled" | ""
    data: bytes | None = None
    path: Path | None = None
    image: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    pixel_threshold: float = 0.5


@dataclass
class PredictionLog:
    """Records predictions without waiting for the store. ``source``: predict | serve; ``model``: what answered."""

    settings: LogSettings
    source: str
    model: str
    counts: dict[str, int] = field(default_factory=lambda: {"logged": 0, "lost": 0, "kept": 0, "not_kept": 0})

    def __post_init__(self) -> None:
        self.pending: queue.Queue[Pending] = queue.Queue(self.settings.max_pending)
        self.review = ReviewQueue(self.settings.review_dir) if self.settings.review_dir else None
        self.engine: sa.Engine | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.last_warning = 0.0
        self.counted_waiting = 0  # rows a flush gave up on (counted lost; a late write counts them again)
        atexit.register(self.close)

    @property
    def enabled(self) -> bool:
        return self.settings.url is not None

    def record(self, results: list[Any], sources: list[Any], thresholds: dict[str, Any]) -> None:
        """Queue one row per result (an :class:`adps.inference.ImagePrediction`, its ``ImageSource`` beside it)."""
        if not self.enabled:
            return
        for result, source in zip(results, sources, strict=True):
            try:
                self.pending.put_nowait(self.pending_row(result, source, thresholds))
            except queue.Full:
                self.count_lost(1, "the log writer is behind (production.max_pending rows waiting)")
            except Exception as err:  # a row that cannot be made never fails the prediction it records
                self.count_lost(
                    1, f"{type(err).__name__} while recording {path_text(result.path)}: {path_text(str(err))}"
                )
        try:
            self.start_writer()
        except RuntimeError as err:  # no thread to be had now: the rows wait for the next record or flush
            logger.warning("prediction log: the writer could not start (%s); rows wait in the queue", err)

    def pending_row(self, result: Any, source: Any, thresholds: dict[str, Any]) -> Pending:
        """The row of one prediction: what the model said, and what its input looked like (for drift)."""
        data, path = source.data, source.path
        sha = content_sha256(data, path)
        row = dict.fromkeys(COLUMNS) | {  # every column in every row: rows are inserted together
            "time": utc_now(),
            "source": self.source,
            "model": self.model,
            "psm_sha256": thresholds.get("checkpoint_sha256"),
            "category": thresholds.get("category"),
            "input_name": result.path,
            "input_sha256": sha,
            "error": result.error or "",
            "kept": "",
        }
        if result.error:
            return Pending(storable_row(row))
        row.update(width=result.original_size[0], height=result.original_size[1], score=result.score)
        row.update(is_anomalous=result.is_anomalous, threshold=result.threshold, **input_statistics(result.image))
        if result.features is not None:
            row["features"] = np.asarray(result.features, np.float16).tobytes()
        row = storable_row(row)
        keep = self.keep_reason(result, sha)
        if data is None and keep:  # read here: the writer never opens a path (one swapped for a FIFO would hang it)
            data = regular_bytes(path)
        if not keep or data is None:
            return Pending(row)
        return Pending(row, keep, data, path, result.image, result.anomaly_map, float(thresholds.get("pixel", 0.5)))

    def keep_reason(self, result: Any, sha: str | None) -> str:
        if self.review is None:
            return ""
        if result.is_anomalous and self.settings.keep_flagged:
            return "flagged"
        return "sampled" if sampled(sha, self.settings.keep_passed_fraction) else ""

    def start_writer(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.write_forever, name="adps-prediction-log", daemon=True)
                self.thread.start()

    def write_forever(self) -> None:
        while True:
            batch = [self.pending.get()]
            while len(batch) < BATCH_ROWS:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self.write(batch)
            except Exception as err:  # the writer never dies: the batch is counted, the next one is written
                self.count_lost(len(batch), failure(err))
            finally:
                for _ in batch:
                    self.pending.task_done()

    def write(self, batch: list[Pending]) -> None:
        """Keep the inputs to review, then insert the rows in one transaction. A store that cannot be reached
        loses (and counts) them all; any other refusal is retried row by row (:meth:`insert_one_by_one`)."""
        for item in batch:
            if item.keep:
                item.row["kept"] = storable_text(self.keep(item), MAX_TEXT)
        try:
            if self.engine is None:
                self.engine = open_store(self.settings.url)
        except (ValueError, sa.exc.ArgumentError):  # its message may quote the URL, password included
            self.count_lost(len(batch), "production.log is not a database URL SQLAlchemy can read")
            return
        except Exception as err:  # a store that is down: the predictions were answered, the rows lost
            self.count_lost(len(batch), failure(err))
            return
        try:
            self.insert([item.row for item in batch])
        except Exception as err:
            if unreachable(err):
                self.lose_store(len(batch), err)
            else:
                self.insert_one_by_one(batch)

    def insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(predictions_table), rows)
        self.counts["logged"] += len(rows)

    def insert_one_by_one(self, batch: list[Pending]) -> None:
        """Each row in a transaction of its own: a row the store refuses is lost alone, counted with why."""
        for done, item in enumerate(batch):
            try:
                self.insert([item.row])
            except Exception as err:
                if unreachable(err):  # the store went away meanwhile: the rest of the batch with it
                    self.lose_store(len(batch) - done, err)
                    return
                self.count_lost(1, f"the store refused the row of {item.row['input_name']}: {failure(err)}")

    def lose_store(self, n: int, err: Exception) -> None:
        """Count ``n`` rows lost to an unreachable store and drop the connection (the next batch reconnects)."""
        if self.engine is not None:
            self.engine.dispose()
        self.engine = None
        self.count_lost(n, failure(err))

    def keep(self, item: Pending) -> str:
        """The review-queue id of the input's copy, or "" when the queue is full or cannot be written."""
        try:
            kept = self.review.add(
                item.row,
                item.keep,
                item.data,
                item.path,
                item.image,
                item.anomaly_map,
                item.pixel_threshold,
                self.settings.keep_max_bytes,
            )
        except Exception as err:  # a copy that cannot be kept never costs the row
            logger.warning("could not keep %s for review: %s", item.row["input_name"], failure(err))
            kept = ""
        self.counts["kept" if kept else "not_kept"] += 1
        return kept

    def count_lost(self, n: int, why: str) -> None:
        self.counts["lost"] += n
        now = time.monotonic()
        if now - self.last_warning >= WARN_EVERY_S or self.counts["lost"] == n:
            self.last_warning = now
            logger.warning(
                "prediction log %s: %d rows not recorded (%d so far; the predictions were answered): %s",
                safe_url(self.settings.url),
                n,
                self.counts["lost"],
                why,
            )

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every queued row is written or lost, at most ``timeout`` seconds; rows still waiting then
        (a store that hangs) are counted as lost. True when none was left."""
        deadline = time.monotonic() + timeout
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = self.pending.unfinished_tasks - self.counted_waiting
        if waiting > 0:
            self.counted_waiting += waiting
            self.count_lost(waiting, f"the store did not take them within {timeout:.0f} s")
        return waiting <= 0

    def close(self) -> None:
        if self.enabled and self.thread is not None and self.pending.unfinished_tasks > self.counted_waiting:
            self.flush()


def unreachable(err: BaseException) -> bool:
    """Whether a store failure is the store being down or gone (not a refusal of the rows themselves)."""
    return isinstance(err, UNREACHABLE) or bool(getattr(err, "connection_invalidated", False))


def failure(err: BaseException) -> str:
    """A store failure in one storable line (its type and first line)."""
    return f"{type(err).__name__}: {path_text(str(err).splitlines()[0][:200] if str(err) else '')}"


def safe_url(url: str | None) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True) if url else "(off)"
    except Exception:  # any URL the parser chokes on (a port that is not a number...)
        return "(unparsable URL)"


def read_rows(
    url: str, since: datetime | None = None, until: datetime | None = None, category: str | None = None
) -> list[dict[str, Any]]:
    """Logged rows (oldest first) with UTC times in ``[since, until)``, of one ``category`` when given."""
    table = predictions_table
    query = sa.select(table).order_by(table.c.time, table.c.id)
    if since is not None:
        query = query.where(table.c.time >= since)
    if until is not None:
        query = query.where(table.c.time < until)
    if category is not None:
        query = query.where(table.c.category == category)
    engine = open_store(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]
    finally:
        engine.dispose()
