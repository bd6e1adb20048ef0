"""Training and inference cost of ADPS as ratios against a plain resnet18 step, measured in one run.

Usage: ``python -m benchmarks.cost [--params params.yaml] [--batch 8] [--size 256] [--repeats 5]``

Same batch, same process, same threads: the ADPS training steps (stage 1: teacher + patch
student + distillation loss; stage 2: teacher + student + WMB + PSM + focal loss) against a plain
torchvision resnet18 forward+backward+Adam step, and ADPS inference against a plain resnet18
forward. Peak RSS of training is measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision

from adps.config import load_params
from adps.evaluation.metrics import aupro
from adps.training.checkpoints import build_model, model_spec
from adps.training.phases import distill_step, psm_param_groups, psm_step


def median_seconds(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(step, optimizer) -> Callable[[dict], None]:
    def run(batch: dict) -> None:
        losses = step(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return run


def make_batch(batch: int, size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.zeros(batch, 1, size, size)
    mask[: batch // 2, :, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    return {"image": torch.randn(batch, 3, size, size), "mask": mask}


def measure(params_path: str, batch_size: int, size: int, repeats: int) -> dict[str, float]:
    params = load_params(params_path)
    params = params.model_copy(update={"data": params.data.model_copy(update={"image_size": size})})
    batch = make_batch(batch_size, size)
    device = torch.device("cpu")

    plain = torchvision.models.resnet18(weights=None)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-4)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        plain(batch["image"]).mean().backward()
        plain_opt.step()

    model = build_model(model_spec(params))
    distill = training_step(
        distill_step(model, params.loss, device), torch.optim.Adam(model.student.parameters(), lr=1e-4)
    )
    psm = training_step(
        psm_step(model, params.loss, params.train.psm, device),
        torch.optim.Adam(psm_param_groups(model, params.train.psm), lr=1e-4),
    )
    plain.eval()
    model.eval()
    with torch.no_grad():
        plain_fwd = median_seconds(lambda: plain(batch["image"]), repeats)
        adps_fwd = median_seconds(lambda: model(batch["image"]), repeats)
    plain.train()
    plain_train = median_seconds(plain_step, repeats)
    return {
        "plain_train_s": plain_train,
        "distill_train_s": median_seconds(lambda: distill(batch), repeats),
        "psm_train_s": median_seconds(lambda: psm(batch), repeats),
        "plain_infer_s": plain_fwd,
        "adps_infer_s": adps_fwd,
    }


def aupro_seconds(n_maps: int = 200, size: int = 256) -> float:
    """Wall time of AUPRO on ``n_maps`` random maps with blob-shaped ground truth."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n_maps, size, size), bool)
    for i in range(0, n_maps, 2):
        cy, cx = rng.integers(size // 8, size - size // 8, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(2, max(3, size // 12)) ** 2
    maps = rng.random(masks.shape).astype(np.float32) + masks
    start = time.perf_counter()
    aupro(maps, masks, 0.3)
    return time.perf_counter() - start


def peak_training_rss_gb(params_path: str, batch_size: int, size: int) -> float:
    """Peak RSS of a fresh process that runs both training steps (GB)."""
    code = (
        "import resource, sys; from benchmarks.cost import measure; "
        f"measure({params_path!r}, {batch_size}, {size}, 1); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    t = measure(args.params, args.batch, args.size, args.repeats)
    rss = peak_training_rss_gb(args.params, args.batch, args.size)
    train_ratio = (t["distill_train_s"] + t["psm_train_s"]) / t["plain_train_s"]
    print(f"batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, device cpu\n")
    print("| measure | seconds/batch | ratio to plain resnet18 | target |\n|---|---|---|---|")
    print(f"| plain resnet18 forward+backward+Adam | {t['plain_train_s']:.3f} | 1.00 | |")
    print(
        f"| ADPS stage 1 step (distillation) | {t['distill_train_s']:.3f} | "
        f"{t['distill_train_s'] / t['plain_train_s']:.2f} | |"
    )
    print(f"| ADPS stage 2 step (PSM) | {t['psm_train_s']:.3f} | {t['psm_train_s'] / t['plain_train_s']:.2f} | |")
    print(
        f"| ADPS training, both stages per batch | {t['distill_train_s'] + t['psm_train_s']:.3f} | "
        f"{train_ratio:.2f} | <= 3 |"
    )
    print(f"| plain resnet18 forward | {t['plain_infer_s']:.3f} | 1.00 | |")
    print(f"| ADPS inference | {t['adps_infer_s']:.3f} | {t['adps_infer_s'] / t['plain_infer_s']:.2f} | <= 3.5 |")
    print(f"| peak RSS of training (GB) | {rss:.2f} | | < 4 |")
    seconds = aupro_seconds()
    print(f"| AUPRO, 200 maps of 256x256 (s) | {seconds:.2f} | | a few seconds |")
    print("\n" + json.dumps({**t, "peak_rss_gb": rss, "aupro_200x256_s": seconds}))


if __name__ == "__main__":
    main()
