"""Training and inference cost of each model kind as ratios against plain backbone steps, in one run.

Usage: ``python -m benchmarks.cost [--params params.yaml] [--batch 8] [--size 256] [--repeats 5]
[--threads 2] [--bank-images 64]``

Same batch, same process, same threads: the ADPS training steps (stage 1: teacher + patch
student + distillation loss; stage 2: teacher + student + WMB + PSM + focal loss) and the memory
bank's build (teacher features of ``--bank-images`` normal images and the greedy coreset, per batch)
against a plain forward+backward+Adam step of the whole classification network of the same backbone
(``model.backbone``, e.g. timm's tf_efficientnet_lite0 with its head) and of torchvision's resnet18;
inference of each kind (ADPS, memory bank, their combination) against a plain forward of each; and
each kind's model size (its saved weights and bank) against the backbone's. Peak RSS of training is
measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import io
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
from adps.model.memory_bank import build_bank
from adps.model.network import ADPS, COMBINED, KINDS, MEMORY_BANK
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


def measure(params_path: str, batch_size: int, size: int, repeats: int, bank_images: int = 64) -> dict[str, float]:
    params = load_params(params_path)
    params = params.model_copy(update={"data": params.data.model_copy(update={"image_size": size})})
    batch = make_batch(batch_size, size)
    device = torch.device("cpu")

    model = build_model(model_spec(params) | {"model": {**model_spec(params)["model"], "kind": COMBINED}})
    distill = training_step(
        distill_step(model, params.loss, device), torch.optim.Adam(model.student.parameters(), lr=1e-4)
    )
    psm = training_step(
        psm_step(model, params.loss, params.train.psm, device),
        torch.optim.Adam(psm_param_groups(model, params.train.psm), lr=1e-4),
    )
    times = {
        "distill_train_s": median_seconds(lambda: distill(batch), repeats),
        "psm_train_s": median_seconds(lambda: psm(batch), repeats),
        "bank_build_s": bank_build_seconds(model, params, batch["image"], bank_images) * batch_size / bank_images,
    }
    model.eval()
    for kind in KINDS:
        model.set_scoring(**params.score.model_dump(), kind=kind)
        with torch.no_grad():
            times[f"{kind}_infer_s"] = median_seconds(lambda: model(batch["image"]), repeats)
    backbone = classification_net(params.model.backbone)
    return {
        **plain_seconds("backbone", backbone, batch["image"], repeats),
        **plain_seconds("resnet18", torchvision.models.resnet18(weights=None), batch["image"], repeats),
        **times,
        "backbone_mb": saved_mb(backbone.state_dict()),
        **{f"{kind}_mb": saved_mb(kind_state(model, kind)) for kind in KINDS},
    }


def bank_build_seconds(model, params, image: torch.Tensor, n_images: int) -> float:
    """Wall time to fill the bank from ``n_images`` normal images (features + coreset) and scale it."""
    cfg = params.model.memory_bank
    batches = [image] * max(1, n_images // len(image))
    start = time.perf_counter()
    build_bank(
        model.memory,
        model.teacher,
        batches,
        [image],
        cfg.coreset_ratio,
        cfg.max_entries,
        cfg.projection_dim,
        0,
        cfg.max_positions,
    )
    return time.perf_counter() - start


def kind_state(model, kind: str) -> dict[str, torch.Tensor]:
    """The weights a model of ``kind`` saves (the combination holds all of them)."""
    left_out = {ADPS: ("memory.",), MEMORY_BANK: ("student.", "psm."), COMBINED: ()}[kind]
    return {k: v for k, v in model.state_dict().items() if not k.startswith(left_out)}


def saved_mb(state: dict[str, torch.Tensor]) -> float:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue()) / 1024**2


def classification_net(backbone: str) -> torch.nn.Module:
    """The whole ImageNet classification network of a backbone name (random init)."""
    if backbone.startswith("efficientnet_lite"):
        import timm

        return timm.create_model(f"tf_{backbone}", pretrained=False)
    return getattr(torchvision.models, backbone)(weights=None)


def plain_seconds(name: str, net: torch.nn.Module, image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a plain forward (eval, no grad) and forward+backward+Adam step (train) of ``net``."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        net(image).mean().backward()
        optimizer.step()

    net.eval()
    with torch.no_grad():
        forward = median_seconds(lambda: net(image), repeats)
    net.train()
    return {f"{name}_train_s": median_seconds(step, repeats), f"{name}_infer_s": forward}


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


def peak_training_rss_gb(params_path: str, batch_size: int, size: int, threads: int) -> float:
    """Peak RSS of a fresh process that runs both training steps (GB)."""
    code = (
        f"import resource, torch; torch.set_num_threads({threads}); from benchmarks.cost import measure; "
        f"measure({params_path!r}, {batch_size}, {size}, 1); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024**2


def cost_table(t: dict[str, float], backbone: str) -> str:
    """Markdown rows: each ADPS cost as seconds per batch and as ratios to both plain networks."""
    train = t["distill_train_s"] + t["psm_train_s"]
    rows = [
        (f"plain {backbone} forward+backward+Adam", t["backbone_train_s"], "train", ""),
        ("plain resnet18 forward+backward+Adam", t["resnet18_train_s"], "train", ""),
        ("ADPS stage 1 step (distillation)", t["distill_train_s"], "train", ""),
        ("ADPS stage 2 step (PSM)", t["psm_train_s"], "train", ""),
        ("ADPS training, both stages per batch", train, "train", "<= 3"),
        ("memory bank build per batch (features + coreset)", t["bank_build_s"], "train", ""),
        ("adps+memory_bank training per batch", train + t["bank_build_s"], "train", ""),
        (f"plain {backbone} forward", t["backbone_infer_s"], "infer", ""),
        ("plain resnet18 forward", t["resnet18_infer_s"], "infer", ""),
        ("ADPS inference (teacher + patch student + WMB + PSM + score)", t["adps_infer_s"], "infer", "<= 3.5"),
        ("memory bank inference (teacher + nearest neighbour + score)", t["memory_bank_infer_s"], "infer", ""),
        ("adps+memory_bank inference", t["adps+memory_bank_infer_s"], "infer", ""),
    ]
    lines = [
        f"| measure | seconds/batch | ratio to plain {backbone} | ratio to plain resnet18 | target |",
        "|---|---|---|---|---|",
    ]
    for label, seconds, kind, target in rows:
        to_backbone, to_resnet = seconds / t[f"backbone_{kind}_s"], seconds / t[f"resnet18_{kind}_s"]
        lines.append(f"| {label} | {seconds:.3f} | {to_backbone:.2f} | {to_resnet:.2f} | {target} |")
    lines += ["", f"| model size | MB | ratio to {backbone}'s weights |", "|---|---|---|"]
    for label, key in [(f"plain {backbone}", "backbone_mb"), *((f"kind {k}", f"{k}_mb") for k in KINDS)]:
        lines.append(f"| {label} | {t[key]:.1f} | {t[key] / t['backbone_mb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (set explicitly: 2-core machines)")
    parser.add_argument("--bank-images", type=int, default=64, help="normal images the bank is built from")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_params(args.params).model.backbone
    t = measure(args.params, args.batch, args.size, args.repeats, args.bank_images)
    rss = peak_training_rss_gb(args.params, args.batch, args.size, args.threads)
    print(f"{backbone}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, device cpu\n")
    print(cost_table(t, backbone))
    seconds = aupro_seconds()
    print(f"\npeak RSS of training (GB, fresh process): {rss:.2f} (target < 4)")
    print(f"AUPRO, 200 maps of 256x256: {seconds:.2f} s")
    print("\n" + json.dumps({**t, "peak_rss_gb": rss, "aupro_200x256_s": seconds}))


if __name__ == "__main__":
    main()
