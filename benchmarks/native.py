"""Native resolution against resize on the high-resolution embedded category: quality and cost, one run.

Usage: ``python -m benchmarks.native [--out benchmarks/out/native] [--category strip] [--threads 2]
[--repeats 5] [--set KEY=VALUE ...] [--skip-pipeline]``

**Quality.** For each of ``data.resolution: resize`` and ``native`` a project folder ``OUT/<mode>``
gets the repository's params.yaml with ``data.categories: [<category>]``, that resolution and the
``--set`` overrides; the stages ``prepare``, ``validate``, ``distill``, ``psm`` and ``evaluate`` run
there (the functions ``dvc repro`` runs), then the training-free kNN floor (``benchmarks/knn_floor.py``)
in the same mode. Pixel metrics stand on the masks at their stored size in both modes (the resize
mode's map is brought back to the image's size).

**Cost**, in this process at ``--threads`` torch threads: training seconds per epoch of both stages
(their histories), and inference ms per megapixel of the image (PyTorch and ONNX Runtime, one image
at a time), each as a ratio to a plain forward of the backbone's classification network (e.g. timm's
tf_efficientnet_lite0) on the same pixels the model sees. For native resolution, the whole padded
image (the pipeline's way) is also timed against tiles of the training size with a quarter overlap,
averaged where they overlap (anomalib's tiler), with the mean difference of their maps.
Results: printed, and in ``OUT/results.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

from adps import paths, stages
from adps.config import Params, load_params, nest_dotted
from adps.data.images import read_rgb
from adps.data.splits import category_splits
from adps.export import onnx_predictor
from adps.files import json_text
from adps.inference import Predictor
from benchmarks.cost import classification_net, median_seconds
from benchmarks.elpv import merge
from benchmarks.knn_floor import cell, knn_floor

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("resize", "native")
QUALITY = (
    ("image_auroc", "image AUROC"),
    ("image_f1_at_threshold", "image F1 at the shipped threshold"),
    ("pixel_ap", "pixel AP"),
    ("aupro", "AUPRO"),
)


def project(out: Path, mode: str, category: str, overrides: dict[str, Any]) -> Params:
    """OUT/<mode> with the repository's params for ``category`` at resolution ``mode`` (and the overrides)."""
    folder = out / mode
    folder.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw = merge(merge(raw, {"data": {"categories": [category], "resolution": mode}}), overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(folder / "params.yaml")


def run_pipeline(params: Params, category: str) -> dict[str, Any]:
    os.chdir(params.root)
    stages.prepare(params)
    for stage in (stages.validate, stages.distill, stages.psm, stages.evaluate, stages.export):
        stage(params, category)
    return json.loads(paths.metrics_file(params, category).read_text())


def epoch_seconds(params: Params, category: str, repeats: int) -> dict[str, float]:
    """Median wall seconds of a training epoch of each stage (from the training histories), and of a plain
    backbone forward over the pixels an epoch sees (its training images as ``image_size``² inputs, batched
    as training batches them)."""
    out = {}
    for phase in ("distill", "psm"):
        history = json.loads(paths.train_history(params, category, phase).read_text())
        out[phase] = statistics.median(entry["seconds"] for entry in history) if history else float("nan")
    train, _, _ = category_splits(params, category)
    batch_size, size = params.train.distill.batch_size, params.data.image_size
    backbone = classification_net(params.model.backbone).eval()
    batch = torch.randn(batch_size, 3, size, size)
    with torch.no_grad():
        out["backbone"] = median_ms(lambda: backbone(batch), repeats) / 1000 * len(train) / batch_size
    return out


def median_ms(fn, repeats: int) -> float:
    return 1000 * median_seconds(fn, repeats, warmup=1)


def tiled_map(model, image: torch.Tensor, tile: int) -> torch.Tensor:
    """(1, 3, H, W) -> (H, W) map from tiles of ``tile`` px with a quarter overlap, averaged where they meet."""
    height, width = image.shape[-2:]
    step = tile * 3 // 4
    tops = sorted({*range(0, max(1, height - tile + 1), step), max(0, height - tile)})
    lefts = sorted({*range(0, max(1, width - tile + 1), step), max(0, width - tile)})
    corners = [(t, left) for t in tops for left in lefts]
    tiles = torch.cat([image[..., t : t + tile, left : left + tile] for t, left in corners])
    maps = model(tiles).anomaly_map[:, 0]
    total, count = torch.zeros(height, width), torch.zeros(height, width)
    for (t, left), one in zip(corners, maps, strict=True):
        total[t : t + tile, left : left + tile] += one
        count[t : t + tile, left : left + tile] += 1
    return total / count


def inference_costs(params: Params, category: str, repeats: int) -> dict[str, float]:
    """ms per megapixel of the images (PyTorch, ONNX Runtime, a plain backbone forward on the model's input)."""
    folder = paths.model_dir(params, category)
    image_path = sorted(paths.category_dir(params, category).glob("test/good/*.png"))[0]
    torch_predictor, onnx = Predictor.from_dir(folder, "cpu"), onnx_predictor(folder)
    image, (width, height) = read_rgb(image_path, torch_predictor.geometry)
    megapixels = width * height / 1e6
    batch = torch.from_numpy(image.transpose(2, 0, 1))[None]
    backbone = classification_net(params.model.backbone).eval()
    with torch.no_grad():
        costs = {
            "megapixels": megapixels,
            "input": f"{image.shape[1]} x {image.shape[0]}",
            "torch_ms_per_mp": median_ms(lambda: torch_predictor.predict_arrays([image]), repeats) / megapixels,
            "onnx_ms_per_mp": median_ms(lambda: onnx.predict_arrays([image]), repeats) / megapixels,
            "backbone_ms_per_mp": median_ms(lambda: backbone(batch), repeats) / megapixels,
        }
        if torch_predictor.geometry.is_native(width, height):
            model, size = torch_predictor.engine.model, params.data.image_size
            normalized = torch_predictor.engine.normalize(image)[None]
            costs["tiled_ms_per_mp"] = median_ms(lambda: tiled_map(model, normalized, size), repeats) / megapixels
            whole = model(normalized).anomaly_map[0, 0]
            costs["tiled_map_mean_abs_diff"] = float((whole - tiled_map(model, normalized, size)).abs().mean())
    return costs


def quality_table(results: dict[str, dict[str, Any]]) -> str:
    head = " | ".join(title for _, title in QUALITY)
    lines = [f"| mode | model | {head} |", "|---|---|" + "---|" * len(QUALITY)]
    for mode in MODES:
        for model in ("pipeline", "floor"):
            row = results[mode][model]
            name = f"this pipeline ({row.get('kind', 'adps')})" if model == "pipeline" else "kNN floor (training-free)"
            lines.append(f"| {mode} | {name} | " + " | ".join(cell(row.get(k)) for k, _ in QUALITY) + " |")
    return "\n".join(lines)


def cost_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| mode | model input | distill s/epoch | psm s/epoch | backbone s/epoch | distill / backbone "
        "| psm / backbone |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        c, e = results[mode]["inference"], results[mode]["epoch_seconds"]
        lines.append(
            f"| {mode} | {c['input']} | {e['distill']:.2f} | {e['psm']:.2f} | {e['backbone']:.2f} | "
            f"{e['distill'] / e['backbone']:.1f} | {e['psm'] / e['backbone']:.1f} |"
        )
    lines += [
        "",
        "| mode | PyTorch ms/MP | ONNX Runtime ms/MP | backbone ms/MP | PyTorch / backbone | ONNX / backbone |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        c = results[mode]["inference"]
        torch_ms, onnx_ms, plain_ms = c["torch_ms_per_mp"], c["onnx_ms_per_mp"], c["backbone_ms_per_mp"]
        lines.append(
            f"| {mode} | {torch_ms:.0f} | {onnx_ms:.0f} | {plain_ms:.0f} | {torch_ms / plain_ms:.2f} | "
            f"{onnx_ms / plain_ms:.2f} |"
        )
    native = results["native"]["inference"]
    if "tiled_ms_per_mp" in native:
        lines.append(
            f"\nNative, whole padded image {native['torch_ms_per_mp']:.0f} ms/MP against tiles with a quarter overlap "
            f"{native['tiled_ms_per_mp']:.0f} ms/MP (PyTorch); mean |map difference| "
            f"{native['tiled_map_mean_abs_diff']:.4f}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/native"))
    parser.add_argument("--category", default="strip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (YAML value)")
    parser.add_argument("--skip-pipeline", action="store_true", help="reuse OUT's trained models (cost and floor only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    overrides = nest_dotted({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    overrides = merge({"runtime": {"threads": args.threads}}, overrides)
    out = args.out.resolve()
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        params = project(out, mode, args.category, overrides)
        pipeline = (
            json.loads(paths.metrics_file(params, args.category).read_text())
            if args.skip_pipeline
            else run_pipeline(params, args.category)
        )
        os.chdir(params.root)
        results[mode] = {
            "pipeline": pipeline,
            "floor": knn_floor(params, args.category),
            "epoch_seconds": epoch_seconds(params, args.category, args.repeats),
            "inference": inference_costs(params, args.category, args.repeats),
        }
    text = quality_table(results) + "\n\n" + cost_table(results)
    (out / "results.json").write_text(json_text(results))
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
