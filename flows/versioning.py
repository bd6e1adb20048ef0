"""What DVC knows, asked by the flow: which stages are stale, and recording what a run produced.

The flow decides "up to date" exactly as ``dvc repro`` does, by asking DVC about each stage right
before it would run (``dvc status --json <stage>``: code, params and data hashes against dvc.lock).
DVC is called as a command in the project root, one call at a time per project (a file lock: the
flow's tasks may run in several processes, e.g. on Dask workers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from adps import paths
from adps.config import Params
from adps.errors import AdpsError
from adps.files import waiting_lock


def dvc(params: Params, *args: str) -> str:
    """Run the ``dvc`` of this environment in the project root; its stdout, or a clear error."""
    executable = Path(sys.executable).with_name("dvc")
    with waiting_lock(paths.dvc_calls_lock(params)):
        out = subprocess.run([str(executable), *args], cwd=params.root, capture_output=True, text=True)
    if out.returncode != 0:
        raise AdpsError(f"`dvc {' '.join(args)}` failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def stage_name(stage: str, category: str | None = None) -> str:
    """The dvc.yaml name of a stage: ``prepare``, or ``distill@fabric`` for a per-category one."""
    return f"{stage}@{category}" if category else stage


def why_stale(params: Params, target: str) -> str | None:
    """Why DVC would rerun ``target`` (e.g. ``changed deps: data/synthetic/fabric (modified)``), or None."""
    status = json.loads(dvc(params, "status", "--json", target) or "{}")
    changes = status.get(target)
    if changes is None:
        return None
    return "; ".join(describe_change(change) for change in changes) or "changed"


def describe_change(change: str | dict[str, dict[str, str]]) -> str:
    """One entry of ``dvc status --json`` in words (``changed command``, or a kind with its paths)."""
    if isinstance(change, str):
        return change
    return "; ".join(
        f"{kind}: " + ", ".join(f"{path} ({state})" for path, state in items.items()) for kind, items in change.items()
    )


def commit(params: Params, targets: list[str]) -> str:
    """Record the outputs of exactly these stages in dvc.lock (the stages this run executed).

    ``--force`` only skips DVC's question "dependencies changed, commit anyway?", which every stage
    that just ran would ask; stages the run did not execute are never named.
    """
    return dvc(params, "commit", "--force", *targets) if targets else ""
