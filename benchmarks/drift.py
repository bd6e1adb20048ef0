"""How often the drift monitor alarms: on the line as it was (false alarms) and on each kind of drift.

    python -m benchmarks.drift --category washer --windows 50      # after make run

Windows of ``--size`` images from the production demo's line (scripts/production_demo.py: fresh images
of the embedded generator, 2 % defects of the known kinds), scored by the trained model and checked
against its reference (models/<category>/reference.json) by the monitor's own code, per phase: the normal
line, lighting x 0.9 and x 0.75, and a new defect kind (paint drops on 25 % of the parts). Prints the
share of windows with an alarm and how often each check fired.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter

import numpy as np
import torch
from PIL import Image

from adps import paths
from adps.config import load_params
from adps.inference import ImageSource, Predictor
from adps.production.drift import window_report
from adps.production.log import LogSettings, PredictionLog
from scripts.production_demo import line_image

PHASES = {  # name -> (demo phase, brightness factor)
    "normal line": ("normal line", 1.0),
    "lighting x 0.9": ("normal line", 0.9),
    "lighting x 0.75": ("lighting drops", 1.0),
    "new defect kind": ("new defect kind", 1.0),
}


def window_rows(predictor: Predictor, category: str, cfg, phase: str, factor: float, start: int, size: int,
                seed: int) -> list[dict]:  # fmt: skip
    """The logged rows of one window of the line (the prediction log's own code, no store)."""
    log = PredictionLog(LogSettings(None, None), "serve", "benchmark")
    sources = []
    for i in range(start, start + size):
        data, _ = line_image(category, cfg, i, phase, seed)
        if factor != 1.0:
            image = np.asarray(Image.open(io.BytesIO(data)), np.float32) * factor
            buffer = io.BytesIO()
            Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
            data = buffer.getvalue()
        sources.append(ImageSource(f"line/{i}.png", data=data))
    results = predictor.predict_batch(sources)
    return [log.pending_row(r, s, predictor.thresholds).row for r, s in zip(results, sources, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="washer")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--windows", type=int, default=50, help="windows per phase")
    parser.add_argument("--size", type=int, default=40, help="images per window")
    parser.add_argument("--seed", type=int, default=7, help="seed of the line's images (the demo uses 2026)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    predictor = Predictor.from_dir(paths.model_dir(params, args.category), "cpu")
    reference = json.loads(paths.reference_file(params, args.category).read_text())
    cfg = params.monitor.model_copy(update={"min_predictions": min(params.monitor.min_predictions, args.size)})
    print(f"{args.category}: {args.windows} windows of {args.size} per phase, reference of {reference['n_normal']} "
          f"held-out normals, alpha {cfg.alpha}\n")  # fmt: skip
    print("| phase | windows with an alarm | score | flag_rate | input | features |\n|---|---|---|---|---|---|")
    for name, (phase, factor) in PHASES.items():
        fired, alarmed = Counter(), 0
        for w in range(args.windows):
            rows = window_rows(predictor, args.category, params.synthetic, phase, factor, w * args.size, args.size,
                               args.seed)  # fmt: skip
            alarms = window_report(reference, rows, cfg)["alarms"]
            alarmed += bool(alarms)
            fired.update(alarms)
        checks = " | ".join(f"{fired[c]}" for c in ("score", "flag_rate", "input", "features"))
        print(f"| {name} | {alarmed} of {args.windows} ({alarmed / args.windows:.0%}) | {checks} |", flush=True)


if __name__ == "__main__":
    main()
