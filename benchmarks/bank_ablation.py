"""What each choice of the memory-bank kind is worth: plain nearest neighbour, + neighbourhood averaging, + coreset.

Usage: ``python -m benchmarks.bank_ablation [--params params.yaml]`` in a project after ``adps prepare``
(the embedded dataset, or ``benchmarks/out/elpv`` after ``python -m benchmarks.elpv``).

Each variant builds the bank exactly as stage ``distill`` does (``stages.fill_memory_bank``) with
``model.memory_bank`` overridden, and is scored by the pipeline's own evaluation (thresholds on the
validation split). No training: the teacher is the pipeline's.

- ``plain``: every training position, no averaging (``neighbourhood: 1, coreset_ratio: 1``): the
  training-free floor's features (its map is the raw distance; here d / (d + s), the same ranking of
  pixels);
- ``+ neighbourhood 3``: each feature averaged over its 3 x 3 positions (PatchCore);
- ``+ coreset 10 %`` (the default): and a greedy k-center coreset of 10 % of the positions.
"""

from __future__ import annotations

import argparse
from typing import Any

from adps import stages
from adps.config import load_params, override_params
from adps.data.datasets import LabelledDataset
from adps.data.splits import category_splits
from adps.evaluation import reports
from adps.evaluation.predictions import predict_dataset, validation_predictions
from adps.model.weights import load_teacher_weights
from adps.runtime import setup_torch
from adps.training.checkpoints import build_model, input_normalizer, model_spec, params_geometry
from benchmarks.knn_floor import cell, mean_of

EVERY_POSITION = {"coreset_ratio": 1.0, "max_entries": 10**9}
VARIANTS = {
    "plain": {"neighbourhood": 1, **EVERY_POSITION},
    "+ neighbourhood 3": {"neighbourhood": 3, **EVERY_POSITION},
    "+ coreset 10 % (default)": {"neighbourhood": 3, "coreset_ratio": 0.1},
}
KEYS = ("image_auroc", "image_ap", "pixel_ap")


def bank_metrics(params, category: str) -> dict[str, Any]:
    """Test metrics of a memory-bank model built with ``params`` (thresholds on validation)."""
    device = setup_torch(params)
    model = build_model(model_spec(params))
    load_teacher_weights(model.teacher.net, params.model.backbone, params.model.teacher_weights)
    train, val, test = category_splits(params, category)
    model.to(device)
    built = stages.fill_memory_bank(params, model, train, val, device)
    model.set_scoring(**params.score.model_dump())
    dataset = LabelledDataset(test, params_geometry(params), input_normalizer(params))
    test_pred = predict_dataset(model, dataset, params.evaluation.batch_size, device)
    thresholds = reports.calibrate(validation_predictions(model, val, params, device), params.threshold, {})
    return {**reports.evaluation_report(test_pred, thresholds, params.evaluation), "entries": built["entries"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    params = load_params(parser.parse_args().params)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for name, bank in VARIANTS.items():
        overrides = {"model.kind": "memory_bank", **{f"model.memory_bank.{k}": v for k, v in bank.items()}}
        variant = override_params(params, overrides)
        rows[name] = {c: bank_metrics(variant, c) for c in params.data.categories}
        rows[name]["mean"] = {k: mean_of([rows[name][c][k] for c in params.data.categories]) for k in KEYS}
    columns = [*params.data.categories, "mean"]
    print("image AUROC / pixel AP (pixel AP '-' without masks); bank entries of the first category\n")
    print("| variant | " + " | ".join(columns) + " | entries |\n" + "|---" * (len(columns) + 2) + "|")
    for name, row in rows.items():
        cells = [f"{cell(row[c]['image_auroc'])} / {cell(row[c]['pixel_ap'])}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + f" | {row[params.data.categories[0]]['entries']} |")


if __name__ == "__main__":
    main()
