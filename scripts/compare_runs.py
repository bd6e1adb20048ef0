"""Compare the outputs of two `make run`s (two project folders): the proof of a refactor.

    python scripts/compare_runs.py BEFORE AFTER

Every model, threshold and metrics file of every category (student.pt, psm.pt, thresholds.json,
model.onnx, reports/metrics/*.json) is compared byte for byte. A file that differs is opened and
compared field by field (checkpoint entries and tensors, JSON keys, the ONNX graph and each
metadata entry), so the report says exactly what changed: e.g. only a checkpoint's ``fingerprint``
and, following it, the ``checkpoint_sha256`` recorded by thresholds.json and model.onnx.
Exit status 0 when all files are byte-identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MODEL_FILES = ("student.pt", "psm.pt", "thresholds.json", "model.onnx")


def compared_files(root: Path) -> list[Path]:
    """The run's outputs, relative to its project folder."""
    models = [p.relative_to(root) for name in MODEL_FILES for p in sorted(root.glob(f"models/*/{name}"))]
    return models + [p.relative_to(root) for p in sorted(root.glob("reports/metrics/*.json"))]


def differing_fields(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two nested values (dicts, lists, tensors)."""
    import torch

    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [d for k in keys for d in differing_fields(before.get(k), after.get(k), f"{prefix}{k}.")]
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        same = before.shape == after.shape and before.dtype == after.dtype and torch.equal(before, after)
        return [] if same else [prefix.rstrip(".")]
    return [] if before == after else [prefix.rstrip(".")]


def open_file(path: Path) -> Any:
    if path.suffix == ".pt":
        import torch

        return torch.load(path, weights_only=True, map_location="cpu")
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path))
        metadata = {p.key: p.value for p in proto.metadata_props}
        return {"graph": proto.graph.SerializeToString(deterministic=True), "metadata": metadata}
    return json.loads(path.read_text())


def compare(before_root: Path, after_root: Path) -> int:
    for root in (before_root, after_root):
        if not root.is_dir():
            sys.exit(f"error: {root} is not a folder (give the project folders of two `make run`s)")
    files = compared_files(before_root)
    if not files:
        sys.exit(f"error: {before_root} holds no models/*/ or reports/metrics/ outputs: run `make run` there first")
    missing = [f for f in files if not (after_root / f).is_file()]
    extra = [f for f in compared_files(after_root) if f not in files]
    changed = 0
    for name in files:
        if name in missing:
            continue
        before, after = before_root / name, after_root / name
        if before.read_bytes() == after.read_bytes():
            print(f"identical  {name}")
            continue
        changed += 1
        fields = differing_fields(open_file(before), open_file(after))
        print(f"DIFFERENT  {name}: {', '.join(fields) or 'bytes only (same content)'}")
    for name in missing:
        print(f"MISSING    {name} (not in {after_root})")
    for name in extra:
        print(f"EXTRA      {name} (not in {before_root})")
    print(f"{len(files) - changed - len(missing)} of {len(files)} files byte-identical")
    return 1 if changed or missing or extra else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="project folder of the first run")
    parser.add_argument("after", type=Path, help="project folder of the second run")
    args = parser.parse_args()
    sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
