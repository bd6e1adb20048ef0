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
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adps.errors import AdpsError


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


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


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
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.write_text(text)
    tmp.chmod(0o666 & ~current_umask())
    return tmp


def json_text(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


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
