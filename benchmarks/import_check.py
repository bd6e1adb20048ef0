"""Real data through the importer: a published dataset's folder imported and validated, with counts.

Usage::

    python -m benchmarks.import_check /path/to/BSData --normal data --anomalous data --masks label
    python -m benchmarks.import_check /path/to/set --set data.mask_threshold=127

``SOURCE`` is one category's folder (its name is the category). A temp project (``--out``, default a
new temp folder) gets the repository's params.yaml with ``data.source: folder``, ``import_path`` the
folder above ``SOURCE``, ``categories: [<SOURCE's name>]`` and the ``--normal/--anomalous/--masks``
names, plus the ``--set`` overrides; the stages ``prepare`` and ``validate`` run there (the functions
``dvc repro`` runs), so the source and this project are never written. Printed as JSON: images
(normal in train and test, defect with and without a mask), the masks the importer wrote (from
annotation files: regions drawn; from thresholded mask files), the files left out (blocking or not)
and the validation outcome with its first failures.

BSData (github.com/2Obe/BSData, CC BY-SA 4.0: clone it yourself, never commit it): ``data/`` holds
every image, ``label/`` one labelme JSON per image with pitting; with ``--normal data --anomalous
data --masks label`` the images with a pitting polygon are defects, the others normal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from adps import paths, stages
from adps.config import load_params, set_dotted
from adps.data import layout
from adps.errors import ValidationFailed

REPO_ROOT = Path(__file__).resolve().parents[1]


def project_params(source: Path, out: Path, folder: dict[str, str], overrides: list[str]):
    """Params of a temp project at ``out`` importing ``source`` as one folder-source category."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"].update(source="folder", import_path=str(source.parent.resolve()), categories=[source.name])
    raw["data"]["folder"].update(folder)
    for override in overrides:
        key, _, value = override.partition("=")
        set_dotted(raw, key, yaml.safe_load(value))
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(out / "params.yaml")


def dataset_counts(params, category: str) -> dict[str, Any]:
    """Images by split and label, defects with masks, and what the importer wrote and left out."""
    folder = paths.category_dir(params, category)
    samples = layout.build_sample_index(folder, category)
    defects = [s for s in samples if s.label == 1]
    manifest = folder / layout.MASK_MANIFEST
    made = json.loads(manifest.read_text())["masks"] if manifest.is_file() else {}
    left_out = layout.read_not_imported(folder)
    regions = sum(int(how.rsplit(": ", 1)[-1].split()[0]) for how in made.values() if how.endswith(" drawn)"))
    return {
        "normal_train": sum(s.label == 0 and s.split == "train" for s in samples),
        "normal_test": sum(s.label == 0 and s.split == "test" for s in samples),
        "defect": len(defects),
        "defect_with_mask": sum(s.mask_path is not None for s in defects),
        "masks_written": len(made),
        "regions_drawn": regions,
        "not_imported": dict(Counter(f"blocking={r['blocking']}" for r in left_out)),
        "not_imported_examples": [f"{r['file']}: {r['reason']}" for r in left_out[:5]],
    }


def check(source: Path, out: Path, folder: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    params = project_params(source, out, folder, overrides)
    category = source.name
    stages.prepare(params)
    result: dict[str, Any] = {"category": category, "project": str(out), **dataset_counts(params, category)}
    try:
        stages.validate(params, category)
        result["validation"] = "passed"
    except ValidationFailed as err:
        result["validation"] = f"failed: {len(err.failures)} problem(s)"
        result["failures"] = [f"{f['file']}: {f['reason']}" for f in err.failures[:5]]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="one category's folder (its name is the category)")
    parser.add_argument("--normal", default="normal")
    parser.add_argument("--anomalous", default="anomalous")
    parser.add_argument("--masks", default="masks")
    parser.add_argument("--mask-suffix", default="_mask")
    parser.add_argument("--out", type=Path, help="the temp project folder (default: a new temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"{args.source} is not a folder")
    out = args.out or Path(tempfile.mkdtemp(prefix="adps-import-check-"))
    folder = {"normal": args.normal, "anomalous": args.anomalous, "masks": args.masks, "mask_suffix": args.mask_suffix}
    result = check(args.source, out, folder, args.set)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result["validation"] == "passed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
