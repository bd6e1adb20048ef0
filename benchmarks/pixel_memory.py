"""Memory of prediction by pixels: what one ``Predictor.predict_batch`` allocates per pixel the model sees.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.pixel_memory [--params params.yaml] [--megapixels 0.25 1 4]
[--kind adps+memory_bank] [--resolution auto]``

Each size runs in a fresh process: the params' model (Lite0 by default, weights as built, a full memory
bank of random entries, so every part that allocates is there), a warm-up on a 256 x 256 image, then one
square PNG of random pixels of that many megapixels through ``predict_batch``. Reported: the peak RSS
above the RSS before the call, per pixel. The numbers behind ``production.max_image_megapixels``.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys

import numpy as np


def random_png(side: int, seed: int = 0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def measure_once(params_path: str, megapixels: float, kind: str, resolution: str) -> dict[str, float]:
    """Peak RSS above the RSS before one ``predict_batch`` of one image (this process; call it fresh)."""
    import torch

    from adps.config import load_params
    from adps.inference import ImageSource, Predictor, TorchEngine
    from adps.training.checkpoints import build_model, model_spec

    torch.manual_seed(0)
    params = load_params(params_path)
    spec = model_spec(params) | {"resolution": resolution}
    model = build_model(spec).eval()
    if hasattr(model, "memory"):
        entries = params.model.memory_bank.max_entries
        model.memory.search.fill(torch.randn(entries, model.memory.search.bank.shape[1]))
    score = params.score.model_dump() | {"kind": kind}
    thresholds = {"image": 0.5, "pixel": 0.5, "score": score, "category": "x", "checkpoint_sha256": "0" * 64}
    predictor = Predictor(TorchEngine(model, spec, score, "cpu"), thresholds)
    predictor.predict_batch([ImageSource("warm-up", data=random_png(256, seed=1))])
    side = round((megapixels * 1e6) ** 0.5)
    data = random_png(side)
    with open("/proc/self/statm") as statm:
        before_kb = int(statm.read().split()[1]) * resource.getpagesize() // 1024
    [result] = predictor.predict_batch([ImageSource("image", data=data)])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not result.error, result.error
    grown = max(0, peak_kb - before_kb) * 1024
    per_pixel = grown / side**2
    return {"megapixels": side * side / 1e6, "side": side, "grown_mb": grown / 2**20, "bytes_per_pixel": per_pixel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--kind", default="adps+memory_bank")
    parser.add_argument("--resolution", default="auto")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_once(args.params, args.megapixels[0], args.kind, args.resolution)))
        return
    print("| megapixels | peak above the loaded model (MB) | bytes per pixel |\n|---|---|---|")
    for size in args.megapixels:
        command = [sys.executable, "-m", "benchmarks.pixel_memory", "--one", "--params", args.params]
        command += ["--megapixels", str(size), "--kind", args.kind, "--resolution", args.resolution]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {row['megapixels']:.2f} | {row['grown_mb']:.0f} | {row['bytes_per_pixel']:.0f} |")


if __name__ == "__main__":
    main()
