"""Real defects: ELPV solar cells, this pipeline against the training-free nearest-neighbour floor.

Usage: ``python -m benchmarks.elpv [--out benchmarks/out/elpv] [--set data.image_size=256 ...]
[--types mono,poly] [--n-val-defects 30] [--skip-pipeline] [--score-ablation]``

The ELPV dataset (Buerhop-Lutz et al. 2018, Deitsch et al. 2019: 2,624 electroluminescence images
of solar cells, 300 x 300, 8-bit grey, each labelled with a defect probability 0, 1/3, 2/3 or 1;
cracks, inactive and dark regions, finger interruptions, cells dark as a whole) installs from the
package index on demand (``pip install elpv-dataset``, 90 MB). Its images are licensed
CC-BY-NC-SA-4.0 (non-commercial): a benchmark to install, never part of this repository, its
dataset or its models, and not installed by ``make setup``.

**Split** (seeded, ``--seed``): per cell type (``mono``, ``poly``), ``--n-train`` cells with p = 0
for training, ``--n-test`` other p = 0 cells and ``--n-test`` + ``--n-val-defects`` cells with p = 1
for test; the uncertain labels (p = 1/3, 2/3) are left out. It is written as an MVTec-layout source
without ``ground_truth/`` (labels by image only) and imported by the project's own importer; the
project's ``data.val_defect_fraction`` then holds ``--n-val-defects`` of the defect cells out of test
for validation, as a factory that knows some rejected parts would: the image threshold and the model
kind (``model.kind: auto``) are chosen on them. Every model is tested on the same ``--n-test`` +
``--n-test`` cells.

**Run**: ``--out`` becomes a project folder whose params.yaml is the repository's with
``data.source: mvtec`` and ``categories: [mono, poly]`` plus the ``--set`` overrides; the stages
``prepare``, ``validate``, ``distill``, ``psm`` and ``evaluate`` run there (the functions ``dvc
repro`` runs), then the floor (``benchmarks/knn_floor.py``) on the same split, teacher and input
size (and at ``--floor-sizes``, default 256²), its threshold chosen on the same validation split.
The table shows the shipped model and each kind the model holds (``metrics["kinds"]``: ADPS alone,
the memory bank alone, their combination). ``--score-ablation`` re-scores the trained ADPS parts (no
retraining) with wider pools of pixels. The tables (image AUROC, image AP, F1 at the shipped
threshold, per type) are printed and written to ``OUT/results.md``, every metric to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from adps import paths, stages
from adps.config import load_params, nest_dotted, override_params
from adps.files import json_text
from adps.model.network import ADPS, KINDS
from benchmarks.knn_floor import cell, knn_floor

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "elpv-dataset"
TYPES = ("mono", "poly")
COLUMNS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("image_f1_at_threshold", "F1 at threshold"))


def elpv_labels() -> list[tuple[Path, float, str]]:
    """(image file, defect probability, cell type) of every cell; installs the package when missing."""
    try:
        module = importlib.import_module("elpv_dataset")
    except ImportError:
        print(f"installing {PACKAGE} (90 MB; images under CC-BY-NC-SA-4.0) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", PACKAGE], check=True)
        importlib.invalidate_caches()
        module = importlib.import_module("elpv_dataset")
    data = Path(module.__file__).parent / "data"
    rows = [line.split() for line in (data / "labels.csv").read_text().splitlines() if line.strip()]
    return [(data / name, float(p), kind) for name, p, kind in rows]


def split_cells(
    labels: list[tuple[Path, float, str]], kind: str, n_train: int, n_test: int, seed: int, n_val_defects: int = 0
) -> dict:
    """Seeded choice of one type's cells: ``{"train/good": [...], "test/good": [...], "test/defect": [...]}``
    (``n_test + n_val_defects`` defect cells: validation takes its share of them at import)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, TYPES.index(kind)]))
    normal = [path for path, p, k in labels if k == kind and p == 0.0]
    defect = [path for path, p, k in labels if k == kind and p == 1.0]
    normal = [normal[i] for i in rng.permutation(len(normal))[: n_train + n_test]]
    defect = [defect[i] for i in rng.permutation(len(defect))[: n_test + n_val_defects]]
    return {"train/good": normal[:n_train], "test/good": normal[n_train:], "test/defect": defect}


def write_source(root: Path, split: dict[str, dict[str, list[Path]]]) -> None:
    """The split as an MVTec-layout source (links to the installed files, no masks)."""
    for kind, folders in split.items():
        for folder, files in folders.items():
            target = root / kind / folder
            target.mkdir(parents=True, exist_ok=True)
            for path in files:
                link = target / path.name
                if not link.exists():
                    os.symlink(path, link)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` deep-merged into a copy of ``base``."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def project_params(out: Path, overrides: dict[str, Any], types: list[str], val_defect_fraction: float = 0.0):
    """The repository's params, pointed at the ELPV source, with ``overrides``; written to OUT/params.yaml."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    data = {"source": "mvtec", "import_path": "source", "categories": types, "val_defect_fraction": val_defect_fraction}
    raw = merge(raw, {"data": data})
    raw = merge(raw, overrides)
    (out / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(out / "params.yaml")


def run_pipeline(params, types: list[str]) -> dict[str, dict[str, Any]]:
    stages.prepare(params)
    results = {}
    for kind in types:
        for stage in (stages.validate, stages.distill, stages.psm, stages.evaluate):
            stage(params, kind)
        results[kind] = json.loads(paths.metrics_file(params, kind).read_text())
    return results


SCORE_VARIANTS = {  # image score of the trained model's map: the shipped one, and wider pools of pixels
    "max of the σ=2 map (default)": {"method": "max", "sigma": 2.0, "topk": 100},
    "max of the σ=8 map": {"method": "max", "sigma": 8.0, "topk": 100},
    "mean of the top 1 % pixels": {"method": "topk", "sigma": 2.0, "topk": 0.01},
    "mean of the top 10 % pixels": {"method": "topk", "sigma": 2.0, "topk": 0.1},
    "mean of the whole map": {"method": "topk", "sigma": 0.0, "topk": 1.0},
}


def score_ablation(params, kind: str) -> dict[str, dict[str, Any]]:
    """Test metrics of the trained model under each image score of :data:`SCORE_VARIANTS` (the
    threshold of each chosen on the validation split, as the pipeline does); no retraining."""
    from adps.data.datasets import LabelledDataset
    from adps.data.splits import category_splits
    from adps.evaluation import reports
    from adps.evaluation.predictions import predict_dataset, validation_predictions
    from adps.runtime import setup_torch
    from adps.training.checkpoints import input_normalizer, load_model, params_geometry

    device = setup_torch(params)
    model, _ = load_model(paths.psm_checkpoint(params, kind))
    model.to(device)
    model_kind = ADPS
    _, val, test = category_splits(params, kind)
    dataset = LabelledDataset(test, params_geometry(params), input_normalizer(params))
    results = {}
    for name, score in SCORE_VARIANTS.items():
        pixels = params.data.image_size**2
        score = {**score, "topk": max(1, round(score["topk"] * pixels)) if score["topk"] <= 1 else score["topk"]}
        model.set_scoring(**score, kind=model_kind)
        val_pred = validation_predictions(model, val, params, device)
        test_pred = predict_dataset(model, dataset, params.evaluation.batch_size, device)
        thresholds = reports.calibrate(val_pred, params.threshold, score)
        results[name] = reports.evaluation_report(test_pred, thresholds, params.evaluation)
    return results


def results_table(results: dict[str, dict[str, dict[str, Any]]], types: list[str]) -> str:
    head = " | ".join(title for _, title in COLUMNS)
    lines = [f"| cell type | model | {head} |", "|---|---|" + "---|" * len(COLUMNS)]
    for kind in types:
        for model, rows in results.items():
            if kind in rows:
                lines.append(f"| {kind} | {model} | " + " | ".join(cell(rows[kind].get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def shipped_kinds(shipped: dict[str, dict[str, Any]]) -> str:
    """One line per cell type: the kind shipped, why, and what its image threshold was chosen on."""
    return "\n".join(
        f"- {t}: ships {m['kind']} ({m['kind_choice']}); image threshold on {m.get('image_threshold_on', '?')}"
        for t, m in shipped.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/elpv"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (YAML value)")
    parser.add_argument("--types", default=",".join(TYPES), help="cell types, of mono,poly")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--n-val-defects", type=int, default=30, help="defect cells held out for validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-ablation", action="store_true", help="also re-score the ADPS parts' maps")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the floor (the pipeline's last results)")
    parser.add_argument(
        "--floor-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[256], help="floor input sizes too"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    types = [t for t in args.types.split(",") if t]
    unknown = sorted(set(types) - set(TYPES))
    if unknown:
        parser.error(f"unknown cell types {unknown}; allowed: {', '.join(TYPES)}")
    overrides = nest_dotted({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels = elpv_labels()
    cells = {t: split_cells(labels, t, args.n_train, args.n_test, args.seed, args.n_val_defects) for t in types}
    write_source(out / "source", cells)
    params = project_params(out, overrides, types, args.n_val_defects / (args.n_test + args.n_val_defects))
    os.chdir(out)
    results: dict[str, dict[str, Any]] = {}
    shipped = (
        {t: json.loads(paths.metrics_file(params, t).read_text()) for t in types}
        if args.skip_pipeline
        else run_pipeline(params, types)
    )
    results[f"this pipeline (model.kind {params.model.kind})"] = shipped
    for kind in KINDS:
        results[f"kind {kind}"] = {t: m["kinds"][kind] for t, m in shipped.items() if kind in m.get("kinds", {})}
    for size in sorted({params.data.image_size, *args.floor_sizes}):
        at_size = override_params(params, {"data.image_size": size})
        results[f"kNN floor (training-free), {size}²"] = {t: knn_floor(at_size, t) for t in types}
    table = results_table(results, types) + "\n\n" + shipped_kinds(shipped)
    if args.score_ablation:
        ablation = {f"ADPS, image score = {name}": {} for name in SCORE_VARIANTS}
        for kind in types:
            for name, metrics in score_ablation(params, kind).items():
                ablation[f"ADPS, image score = {name}"][kind] = metrics
        table += "\n\nImage-score ablation (the same trained models, thresholds re-chosen on validation):\n\n"
        table += results_table(ablation, types)
        results.update(ablation)
    (out / "results.json").write_text(json_text(results))
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
