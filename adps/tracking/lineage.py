"""What a registered model is made of and where it came from.

Its identity (weights, thresholds, the code that serves it), git state, the dataset manifest
and the changes between two manifests or two sets of params.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

from adps import paths
from adps.config import Params
from adps.files import file_sha256
from adps.production.review import REVIEWED_PREFIX

logger = logging.getLogger(__name__)


MANIFEST_ARTIFACT = "data/manifest.json"  # sha256 of every file of the category's dataset


PACKAGE_DIR = Path(__file__).parents[1]
SERVING_CODE = PACKAGE_DIR / "serving.py"  # the models-from-code pyfunc the registry bundles


PACKAGE_DATA = ("telemetry.env",)  # read by adps/__init__.py at import


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else ""


def model_hash(params: Params, category: str) -> str:
    """Identity of a deployable model: its weights, its thresholds and the code that serves them.

    The code counts because the registered model bundles it: a change to how images are read or
    scored must register a new version, not leave the old code serving under the old one.
    """
    parts = [file_md5(paths.psm_checkpoint(params, category)), file_md5(paths.thresholds_file(params, category))]
    return hashlib.sha256("".join([*parts, served_code_digest()]).encode()).hexdigest()[:32]


def served_code() -> list[Path]:
    """The package files the served model runs: serving.py, every ``adps`` module it imports (at any depth,
    in functions too) with their packages' ``__init__.py``, and the package data they read; sorted."""
    from modulefinder import ModuleFinder

    finder = ModuleFinder(path=[str(PACKAGE_DIR.parent)])  # only the project: nothing else is scanned
    finder.run_script(str(SERVING_CODE))
    files = {Path(m.__file__) for name, m in finder.modules.items() if name.split(".")[0] == "adps" and m.__file__}
    return sorted(files | {SERVING_CODE} | {PACKAGE_DIR / name for name in PACKAGE_DATA})


def served_code_digest() -> str:
    digest = hashlib.sha256()
    for path in served_code():
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def git_tags(root: Path) -> dict[str, str]:
    """The commit, and whether source or params differ from it (the pipeline's own outputs do not count)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    outputs = [f":(exclude){path}" for path in paths.pipeline_outputs()]
    changed = git("status", "--porcelain", "--", ".", *outputs)
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(changed)).lower() if commit else "unknown"}


def data_manifest(params: Params, category: str) -> dict[str, str]:
    """sha256 of every file of the category's dataset, by path relative to the category folder."""
    folder = paths.category_dir(params, category)
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_digest(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def data_changes(old: dict[str, str], new: dict[str, str]) -> str:
    """Files added, removed and changed per folder, e.g. ``+5 train/good, +2 test/anomalous``."""
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(set(old) | set(new)):
        kind = "+" if path not in old else "-" if path not in new else "changed " if old[path] != new[path] else None
        if kind:
            folder = str(Path(path).parent)
            counts.setdefault(folder, {}).setdefault(kind, 0)
            counts[folder][kind] += 1
    return (
        ", ".join(f"{kind}{n} {folder}" for folder, kinds in counts.items() for kind, n in kinds.items()) or "unchanged"
    )


def reviewed_images(manifest: dict[str, str]) -> dict[str, int]:
    """Images in a dataset manifest that came through ``adps review`` (a person's verdict), per folder
    (``train/good``, ``test/good``, ``test/anomalous``); their masks are not counted."""
    counts: dict[str, int] = {}
    for path in manifest:
        if Path(path).name.startswith(REVIEWED_PREFIX) and not path.startswith("ground_truth/"):
            folder = str(Path(path).parent)
            counts[folder] = counts.get(folder, 0) + 1
    return counts


def reviewed_line(manifest: dict[str, str]) -> str:
    """The version page's line on reviewed images: how many went in, and where."""
    counts = reviewed_images(manifest)
    if not counts:
        return "**Reviewed images**: none (no `adps review` verdicts in this version's data)."
    where = ", ".join(f"{n} {folder}" for folder, n in sorted(counts.items()))
    total = sum(counts.values())
    return f"**Reviewed images**: {total} images judged with `adps review` are in this version's data ({where})."


def params_changes(old: dict[str, str], new: dict[str, str], shown: int = 8) -> str:
    """Params that differ from the previous version's run: ``key old -> new``."""
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"`{k}` {old.get(k, '-')} -> {new.get(k, '-')}" for k in changed[:shown]]
    more = [f"{len(changed) - shown} more"] if len(changed) > shown else []
    return "; ".join(parts + more) or "unchanged"
