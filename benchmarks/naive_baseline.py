"""Naive-baseline difficulty check of the dataset (per-pixel deviation from the mean train image).

Usage: ``python -m benchmarks.naive_baseline [--params params.yaml]`` after ``adps prepare``.
"""

from __future__ import annotations

import argparse

from adps import paths
from adps.config import load_params
from adps.data.layout import build_sample_index
from adps.evaluation.naive import naive_baseline_scores


def naive_baseline_table(params_path: str) -> dict[str, dict[str, float]]:
    params = load_params(params_path)
    rows = {}
    for category in params.data.categories:
        samples = build_sample_index(paths.category_dir(params, category), category)
        rows[category] = naive_baseline_scores(samples, params.data.image_size)
    rows["mean"] = {k: sum(r[k] for r in rows.values()) / len(rows) for k in next(iter(rows.values()))}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    rows = naive_baseline_table(parser.parse_args().params)
    print("| category | pixel AP | pixel AUROC | image AUROC |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['pixel_ap']:.3f} | {r['pixel_auroc']:.3f} | {r['image_auroc']:.3f} |")


if __name__ == "__main__":
    main()
