"""The paper's ablation on the configured dataset: asymmetric k vs symmetric KD, WMB/PSM, the teacher.

Usage: ``python -m benchmarks.ablation [--params params.yaml] [--out benchmarks/out/ablation]
[--adps-from DIR] [--variants k8,symmetric,random_resnet18]`` after ``adps prepare``. Each variant
trains in its own folder (the dataset is linked, not copied); ``--adps-from`` reuses a project
folder where ``dvc repro`` already ran with the same params (its metrics and students) instead of
training the ADPS variant again. Variants (everything else as in the params file):

- ``adps``: the params as given (asymmetric, k = model.patches, WMB + PSM);
- ``no_wmb_psm``: the ADPS student alone, anomaly map = mean over levels of 1 - cos(T_i, S_i);
- ``k8``: model.patches = 8; ``k2``: model.patches = 2;
- ``symmetric``: model.patches = 1 (plain distillation, then WMB + PSM);
- ``random_resnet18``: model.backbone = resnet18 with a random-init teacher (BatchNorm statistics
  from the normal images), what the pipeline ran on offline machines before the packaged weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from adps import paths, stages
from adps.config import params_from_dict
from adps.data.datasets import LabelledDataset
from adps.data.splits import category_splits
from adps.evaluation.metrics import detection_metrics
from adps.evaluation.predictions import predict_dataset
from adps.files import finite_json
from adps.model.network import cosine_anomaly_map
from adps.runtime import setup_torch
from adps.training.checkpoints import input_normalizer, load_model, params_geometry


def cosine_maps(model, image):
    anomaly_map = cosine_anomaly_map(model.distill(image), tuple(image.shape[-2:]))
    return anomaly_map, model.scorer(anomaly_map)


def run_variant(root: Path, name: str, raw: dict[str, Any], data_dir: Path) -> dict[str, dict[str, float]]:
    """Train and evaluate every category with ``raw`` params in ``root/name``; returns metrics per category."""
    folder = root / name
    params = params_from_dict(raw, root=folder)
    link = paths.dataset_dir(params)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(data_dir.resolve())
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    results = {}
    for category in params.data.categories:
        stages.distill(params, category)
        stages.psm(params, category)
        stages.evaluate(params, category)
        results[category] = json.loads(paths.metrics_file(params, category).read_text())
        if name == "adps":
            results[f"{category}/no_wmb_psm"] = student_only_metrics(params, category)
    return results


def reuse_variant(folder: Path, params) -> dict[str, dict[str, float]]:
    """The ADPS variant from a project folder where the pipeline already ran with these params."""
    params = params.at(folder)
    results = {}
    for category in params.data.categories:
        results[category] = json.loads(paths.metrics_file(params, category).read_text())
        results[f"{category}/no_wmb_psm"] = student_only_metrics(params, category)
    return results


def student_only_metrics(params, category: str) -> dict[str, float]:
    """Metrics of the stage-1 student alone (map = 1 - cos), on the test split."""
    device = setup_torch(params)
    model, _ = load_model(paths.student_checkpoint(params, category))
    model.to(device).set_scoring(**params.score.model_dump())
    _, _, test = category_splits(params, category)
    pred = predict_dataset(
        model,
        LabelledDataset(test, params_geometry(params), input_normalizer(params)),
        params.evaluation.batch_size,
        device,
        map_fn=cosine_maps,
    )
    return detection_metrics(
        pred.scores, pred.labels, pred.maps, pred.masks, params.evaluation.aupro_fpr_limit, pred.masked
    )


VARIANTS = {
    "k8": {"model": {"patches": 8}},
    "k2": {"model": {"patches": 2}},
    "symmetric": {"model": {"patches": 1}},
    "random_resnet18": {"model": {"backbone": "resnet18", "teacher_weights": "none"}},
}
TITLES = {
    "k8": "k=8",
    "k2": "k=2",
    "symmetric": "symmetric k=1",
    "random_resnet18": "random-init resnet18",
}


def variant_params(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """``raw`` with the sections of variant ``name`` updated."""
    out = dict(raw)
    for section, values in VARIANTS[name].items():
        out[section] = {**raw.get(section, {}), **values}
    return out


def ablation_table(results: dict[str, dict[str, dict[str, float]]], categories: list[str], k: int = 4) -> str:
    columns = [("adps", "adps", f"ADPS k={k}"), ("adps", "no_wmb_psm", "no WMB/PSM")]
    columns += [(name, name, TITLES[name]) for name in VARIANTS if name in results]
    head = " | ".join(f"{title} {m}" for _, _, title in columns for m in ("pixel AP", "image AUROC"))
    lines = [f"| category | {head} |", "|---" * (1 + 2 * len(columns)) + "|"]
    means: dict[str, list[float]] = {}
    for category in [*categories, "mean"]:
        cells = []
        for variant, key, title in columns:
            for metric in ("pixel_ap", "image_auroc"):
                if category == "mean":
                    value = float(np.mean(means[f"{title}{metric}"]))
                else:
                    row = results[variant][category if key != "no_wmb_psm" else f"{category}/no_wmb_psm"]
                    value = row[metric]
                    means.setdefault(f"{title}{metric}", []).append(value)
                cells.append(f"{value:.3f}")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="benchmarks/out/ablation")
    parser.add_argument("--adps-from", type=Path, help="project folder with a finished run of these params")
    parser.add_argument("--variants", default="k8,symmetric,random_resnet18", help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.params).read_text())
    params = params_from_dict(raw, root=Path(args.params).resolve().parent)
    data_dir = paths.dataset_dir(params)
    root = Path(args.out)
    adps = reuse_variant(args.adps_from, params) if args.adps_from else run_variant(root, "adps", raw, data_dir)
    results = {"adps": adps}
    for name in args.variants.split(","):
        results[name] = run_variant(root, name, variant_params(raw, name), data_dir)
        (root / "results.json").write_text(json.dumps(finite_json(results), indent=2, default=str, allow_nan=False))
        print(f"{name} done", flush=True)
    print(ablation_table(results, list(params.data.categories), params.model.patches))


if __name__ == "__main__":
    main()
