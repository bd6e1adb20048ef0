"""Teacher and student backbones: torchvision ResNets cut after ``layer3``.

The teacher sees the whole image; the student sees it cut into k x k non-overlapping patches folded
into the batch, and its per-level outputs are stitched back by patch position (asymmetric
distillation). ``split_after`` lists the stage boundaries (0 = input, 1 = after layer1, 2 = after
layer2) at which the student's current maps are cut again into k x k patches.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from adps.errors import AdpsError

logger = logging.getLogger(__name__)

BACKBONES = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2, torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
}
STAGES = ("layer1", "layer2", "layer3")
STRIDES = (4, 8, 16)


class TeacherWeightsError(AdpsError):
    """The requested teacher weights cannot be had; the message names the other choices."""


def build_resnet(backbone: str) -> nn.ModuleDict:
    """A randomly initialised ResNet as ``stem`` + ``layer1..3`` (no layer4, no head)."""
    net = BACKBONES[backbone][0](weights=None)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return nn.ModuleDict({"stem": stem, "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3})


def stage_channels(backbone: str) -> tuple[int, int, int]:
    return (64, 128, 256) if backbone == "resnet18" else (256, 512, 1024)


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (cache or download), mapped onto :func:`build_resnet` names."""
    try:
        full = BACKBONES[backbone][1].get_state_dict(progress=False)
    except Exception as err:  # URLError, HTTPError, OSError: all mean "not obtainable here"
        raise TeacherWeightsError(
            f"ImageNet weights for {backbone} are not available ({type(err).__name__}: {err}). "
            "Set model.teacher_weights to a state-dict file path (air-gapped sites), 'none' (random init) "
            "or 'auto' (ImageNet when obtainable, else random init with a warning)."
        ) from err
    return remap_torchvision_keys(full)


def remap_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a full torchvision ResNet state dict to stem/layer1..3 keys, dropping layer4 and fc."""
    stem = {"conv1": "stem.0", "bn1": "stem.1"}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in stem:
            out[f"{stem[head]}.{rest}"] = value
        elif head in STAGES:
            out[key] = value
    return out


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TeacherWeightsError(
            f"model.teacher_weights file not found: {path}. Give a torchvision ResNet state dict, or use "
            "'imagenet', 'none' or 'auto'."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TeacherWeightsError(f"cannot load teacher weights {path}: {err}") from err
    return remap_torchvision_keys(state.get("state_dict", state))


def load_teacher_weights(teacher: nn.ModuleDict, backbone: str, choice: str) -> str:
    """Fill ``teacher`` according to ``model.teacher_weights``; return a record of what was used."""
    if choice == "none":
        return "none (random init)"
    if choice in ("imagenet", "auto"):
        try:
            teacher.load_state_dict(imagenet_state_dict(backbone))
            return f"imagenet ({BACKBONES[backbone][1]})"
        except TeacherWeightsError as err:
            if choice == "imagenet":
                raise
            logger.warning("!!! teacher_weights=auto: %s Falling back to RANDOM INIT: results will be weaker.", err)
            return "none (random init; auto fallback, ImageNet weights unavailable)"
    path = Path(choice)
    teacher.load_state_dict(file_state_dict(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"file {path} (sha256 {digest})"


@torch.no_grad()
def calibrate_batchnorm(net: nn.ModuleDict, batches: list[torch.Tensor]) -> None:
    """Set the BatchNorm statistics of a random-init network from normal images (no weight changes).

    A random-init ResNet in eval mode has running mean 0 and variance 1, so its BatchNorm layers do
    not normalise and a few channels dominate the cosine similarity; data statistics fix that.
    """
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over all batches
    net.train()
    for batch in batches:
        x = net["stem"](batch)
        for stage in STAGES:
            x = net[stage](x)
    for layer in layers:
        layer.momentum = 0.1
    net.eval()


def split_into_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*k*k, C, H/k, W/k); patch (i, j) of image b sits at index b*k*k + i*k + j."""
    b, c, h, w = x.shape
    if h % k or w % k:
        raise ValueError(f"map of size {h}x{w} cannot be cut into {k}x{k} patches")
    x = x.view(b, c, k, h // k, k, w // k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * k * k, c, h // k, w // k)


def stitch_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`split_into_patches`: (B*k*k, C, h, w) -> (B, C, h*k, w*k)."""
    bk, c, h, w = x.shape
    x = x.view(bk // (k * k), k, k, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(bk // (k * k), c, k * h, k * w)


class Teacher(nn.Module):
    """Frozen backbone on the whole image; always in eval mode. Returns [layer1, layer2, layer3] maps."""

    def __init__(self, backbone: str):
        super().__init__()
        self.net = build_resnet(backbone)
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.net["stem"](image)
        feats = []
        for stage in STAGES:
            x = self.net[stage](x)
            feats.append(x)
        return feats


class Student(nn.Module):
    """Trainable backbone that sees the image as k x k patches (k = 1: plain symmetric distillation)."""

    def __init__(self, backbone: str, patches: int, split_after: tuple[int, ...]):
        super().__init__()
        self.net = build_resnet(backbone)
        self.k = patches
        self.split_after = set(split_after)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        splits = 0
        x = image
        if 0 in self.split_after and self.k > 1:
            x, splits = split_into_patches(x, self.k), 1
        x = self.net["stem"](x)
        feats = []
        for index, stage in enumerate(STAGES, start=1):
            x = self.net[stage](x)
            feats.append(self.stitch(x, splits))
            if index in self.split_after and self.k > 1 and index < len(STAGES):
                x, splits = split_into_patches(x, self.k), splits + 1
        return feats

    def stitch(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        for _ in range(splits):
            x = stitch_patches(x, self.k)
        return x
