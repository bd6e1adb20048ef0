"""Atomic writes: a temp file or folder next to the target, renamed over it only when complete.

Temp names are ``.<target name>.<random>.tmp``; a killed run leaves one behind, and the next write
of the same target removes it (:func:`remove_stale_temps`). Results get the permissions a plain
``open``/``mkdir`` would give under the user's umask (``mkstemp``/``mkdtemp`` alone give 0600/0700).
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from adps.errors import AdpsError


def path_text(path: Path | str) -> str:
    """A file name or path as text that every writer (CSV, JSON, a database, a terminal) accepts.

    Linux file names are bytes: a name that is not UTF-8 (``d\\xe9faut.png`` from a latin-1 machine)
    reaches Python with surrogate escapes, which UTF-8 writers refuse. Such bytes are shown as ``\\xNN``
    (as ``ls -b`` does); control characters (NUL, newlines, which break CSV rows and database text) as
    ``\\xNN`` too. A valid UTF-8 name is returned unchanged. Applying it twice changes nothing (names pass
    through several writers), so a backslash is left as it is: a name that spells ``\\xe9`` and one holding
    that byte read the same (their heatmap files are still kept apart).
    """
    try:
        text = os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to (from JSON, say)
        text = str(path).encode("utf-8", "backslashreplace").decode()
    return "".join(c if c.isprintable() else escaped(c) for c in text)


def escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


SPECIAL_FILES = {  # what a file that is not a regular file is, by its stat mode
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def not_a_regular_file(path: Path | str) -> str:
    """Why ``path`` cannot be read as a file ("" when it is a regular file, links followed), found by ``os.stat``
    alone: the file is never opened, since opening a FIFO waits for a writer forever and opening a device
    may act on it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as err:  # missing, a broken link, a loop of links, a NUL in the name
        return getattr(err, "strerror", None) or str(err)
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode) and not os.access(path, os.R_OK | os.X_OK):
        return "it is a folder that cannot be read (permission denied)"
    return f"it is {SPECIAL_FILES.get(stat.S_IFMT(mode), 'not a regular file')}"


def open_regular(path: Path | str) -> IO[bytes]:
    """Open a regular file for reading; anything else raises ``OSError`` saying what it is.

    Checked with ``os.stat`` before opening (see :func:`not_a_regular_file`), and again on the open file,
    opened without blocking, in case the name was swapped for a FIFO in between.
    """
    if problem := not_a_regular_file(path):
        raise OSError(problem)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("it is not a regular file (it changed while being opened)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks (weights files, checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(folder: Path) -> str:
    """sha256 over every file's path (relative to ``folder``) and content: "" for a missing folder."""
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(target: Path) -> None:
    """Delete temp files and folders that a killed write of ``target`` left next to it."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def stage_file(target: Path, write: Callable[[Path], None], sync: bool = False) -> Path:
    """``write(tmp)`` on a temp file next to ``target`` (the same file system, so a rename places it whole),
    with the permissions the umask gives; flushed to disk with ``sync``. Not yet renamed over ``target``: the
    caller does that (or removes it); a failed write leaves nothing behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~current_umask())
        if sync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = stage_file(path, write)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """``text`` as UTF-8, whatever the machine's locale (a latin-1 locale cannot write most names)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: Path, payload: Any) -> Path:
    return write_text_atomically(path, json_text(payload))


def build_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder's new contents in a temp sibling with ``build(tmp)``; returns the temp folder.

    The caller swaps it in with :func:`swap_in_dir` (or removes it on failure); several folders built
    this way can be swapped in together, after every one of them was built.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~current_umask())
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def swap_in_dir(tmp: Path, target: Path) -> Path:
    """Put a folder built by :func:`build_dir` in place of ``target`` (the old one is removed)."""
    old = target.with_name(f".{target.name}.old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def replace_dir_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temp sibling with ``build(tmp)``, then swap it in place of ``target``.

    If ``build`` raises, ``target`` is left exactly as it was.
    """
    return swap_in_dir(build_dir(target, build), Path(target))


def same_tree(a: Path, b: Path) -> bool:
    """Whether two folders hold the same relative file paths with the same bytes (links: the same target)."""

    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink())

    def same(x: Path, y: Path) -> bool:
        if x.is_symlink() or y.is_symlink():
            return x.is_symlink() and y.is_symlink() and os.readlink(x) == os.readlink(y)
        return filecmp.cmp(x, y, shallow=False)

    listing = files(a)
    return listing == files(b) and all(same(a / rel, b / rel) for rel in listing)


def refresh_dir(target: Path, build: Callable[[Path], None]) -> bool:
    """Rebuild a folder in a temp sibling; swap it in only when its contents differ from ``target``.

    An unchanged folder is not touched at all (same files, same timestamps), so tools hashing it
    (DVC) see nothing new. Returns whether ``target`` changed.
    """
    target = Path(target)
    tmp = build_dir(target, build)
    if target.is_dir() and same_tree(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    swap_in_dir(tmp, target)
    return True


def write_together(folders: dict[Path, Callable[[Path], None]], texts: dict[Path, str]) -> None:
    """Build every folder and write every text file next to its target, then swap them all in.

    A failure while building changes none of the targets (a stage's outputs stay consistent: e.g. new
    thresholds never sit beside old metrics). Texts are swapped in last, in the order given.
    """
    built: dict[Path, Path] = {}
    staged: dict[Path, Path] = {}
    try:
        for target, build in folders.items():
            built[Path(target)] = build_dir(target, build)
        for target, text in texts.items():
            staged[Path(target)] = stage_text(Path(target), text)
    except BaseException:
        for tmp in built.values():
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    for target, tmp in built.items():
        swap_in_dir(tmp, target)
    for target, tmp in staged.items():
        os.replace(tmp, target)


def stage_text(path: Path, text: str) -> Path:
    """``text`` in a temp file next to ``path`` (not yet renamed over it)."""
    return stage_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(payload: Any) -> str:
    """``payload`` as valid JSON (NaN and infinities as null, see :func:`finite_json`), keys sorted."""
    return json.dumps(finite_json(payload), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def finite_json(payload: Any) -> Any:
    """``payload`` with every NaN or infinite float as None, numpy scalars and arrays as plain Python.

    JSON has no NaN: Python's ``json`` writes a bare ``NaN`` that strict readers (JavaScript's
    ``JSON.parse``, Go, jq) refuse, losing the whole document. An undefined value (an AUROC without
    both classes) is null instead.
    """
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: finite_json(value) for key, value in payload.items()}
    if isinstance(payload, list | tuple):
        return [finite_json(value) for value in payload]
    if hasattr(payload, "tolist") and type(payload).__module__ == "numpy":  # numpy scalars and arrays
        return finite_json(payload.tolist())
    return payload


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block, or fail at once if another process holds it.

    The holder writes its pid into the file, so the error can say who holds it: ``busy`` followed by
    that pid. The lock goes with the process (a killed holder releases it).
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise AdpsError(f"{busy} (held by {holder}, lock {lock_file}).") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def waiting_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block, waiting for other processes and threads."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
