"""Teacher and student backbones, cut into ``stem`` + three levels at strides 4, 8 and 16.

One table, :data:`BACKBONES`, holds what differs between backbone architectures: how to build the
network, its level widths and the input normalisation its weights were trained with. ResNets are
torchvision's (levels ``layer1..3``). EfficientNet-Lite nets are timm's ``tf_efficientnet_lite*``
(levels after stages 1, 2 and 4 of the MBConv blocks: 24/40/112 channels for Lite0). Where their
ImageNet weights come from is :mod:`adps.model.weights`.

The teacher sees the whole image; the student sees it cut into k x k non-overlapping patches folded
into the batch, and its per-level outputs are stitched back by patch position (asymmetric
distillation). ``split_after`` lists the level boundaries (0 = input, 1 = after level 1, 2 = after
level 2) at which the student's current maps are cut again into k x k patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torchvision
from torch import nn

STAGES = ("layer1", "layer2", "layer3")
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TF-ported EfficientNet-Lite weights expect (255 x - 127) / 128, i.e. (x - 127/255) / (128/255).
TF_LITE_MEAN_STD = ((127 / 255,) * 3, (128 / 255,) * 3)


@dataclass(frozen=True)
class Backbone:
    """What the pipeline needs to know of one backbone."""

    build: Callable[[], nn.ModuleDict]  # random-init stem + layer1..3
    channels: tuple[int, int, int]  # widths of the three levels
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]  # input normalisation of its ImageNet weights


def build_resnet(name: str) -> nn.ModuleDict:
    """A randomly initialised torchvision ResNet as ``stem`` + ``layer1..3`` (no layer4, no head)."""
    net = getattr(torchvision.models, name)(weights=None)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return nn.ModuleDict({"stem": stem, "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3})


def build_efficientnet_lite(name: str) -> nn.ModuleDict:
    """A randomly initialised timm ``tf_<name>`` as ``stem`` (conv, BN, ReLU6, stage 0) + three levels.

    Levels end after MBConv stages 1 (stride 4), 2 (stride 8) and 4 (stride 16); stages 5-6, the head
    and the classifier are dropped.
    """
    import timm

    net = timm.create_model(f"tf_{name}", pretrained=False)
    return nn.ModuleDict(
        {
            "stem": nn.Sequential(net.conv_stem, net.bn1, net.blocks[0]),
            "layer1": net.blocks[1],
            "layer2": net.blocks[2],
            "layer3": nn.Sequential(net.blocks[3], net.blocks[4]),
        }
    )


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(lambda: build_resnet("resnet18"), (64, 128, 256), IMAGENET_MEAN_STD),
    "wide_resnet50_2": Backbone(lambda: build_resnet("wide_resnet50_2"), (256, 512, 1024), IMAGENET_MEAN_STD),
    "efficientnet_lite0": Backbone(
        lambda: build_efficientnet_lite("efficientnet_lite0"), (24, 40, 112), TF_LITE_MEAN_STD
    ),
    "efficientnet_lite1": Backbone(
        lambda: build_efficientnet_lite("efficientnet_lite1"), (24, 40, 112), TF_LITE_MEAN_STD
    ),
    "efficientnet_lite2": Backbone(
        lambda: build_efficientnet_lite("efficientnet_lite2"), (24, 48, 120), TF_LITE_MEAN_STD
    ),
}


def build_backbone(name: str) -> nn.ModuleDict:
    return BACKBONES[name].build()


def stage_channels(name: str) -> tuple[int, int, int]:
    return BACKBONES[name].channels


def input_normalization(
    backbone: str, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> tuple[list[float], list[float]]:
    """(mean, std) of the model input: the backbone weights' own, unless ``mean`` / ``std`` override them."""
    own_mean, own_std = BACKBONES[backbone].mean_std
    return list(mean if mean is not None else own_mean), list(std if std is not None else own_std)


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


def split_into_patches(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B*r*c, C, size, size) and the grid (r, c) = (H/size, W/size); patch (i, j) of image b
    sits at index b*r*c + i*c + j. The patch size, not their number, is what training fixes."""
    b, ch, h, w = x.shape
    if h % size or w % size:
        raise ValueError(f"map of size {h}x{w} cannot be cut into patches of {size}x{size}")
    rows, cols = h // size, w // size
    x = x.view(b, ch, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * rows * cols, ch, size, size), (rows, cols)


def stitch_patches(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`split_into_patches`: (B*r*c, C, h, w) -> (B, C, h*r, w*c)."""
    rows, cols = grid
    brc, c, h, w = x.shape
    x = x.view(brc // (rows * cols), rows, cols, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(brc // (rows * cols), c, rows * h, cols * w)


class Teacher(nn.Module):
    """Frozen backbone on the whole image; always in eval mode. Returns [layer1, layer2, layer3] maps."""

    def __init__(self, backbone: str):
        super().__init__()
        self.net = build_backbone(backbone)
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
    """Trainable backbone that sees the image as patches of ``input_size / k`` pixels (k = 1: plain symmetric
    distillation). At the training input size that is k x k patches; a larger image is cut into more of the
    same size, so each patch shows the student what it was trained on."""

    # stride of the maps at each split boundary: the input, after layer1, after layer2
    STRIDE_AT: ClassVar[dict[int, int]] = {0: 1, 1: 4, 2: 8}

    def __init__(self, backbone: str, patches: int, split_after: tuple[int, ...], input_size: int):
        super().__init__()
        self.net = build_backbone(backbone)
        self.k = patches
        self.split_after = set(split_after)
        self.input_size = input_size

    def split(self, x: torch.Tensor, boundary: int, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Cut ``x`` into the patches that are k x k at the training input size (nested within earlier cuts)."""
        size = self.input_size // (self.STRIDE_AT[boundary] * self.k ** (len(grids) + 1))
        x, grid = split_into_patches(x, size)
        grids.append(grid)
        return x

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        grids: list[tuple[int, int]] = []
        x = image
        if 0 in self.split_after and self.k > 1:
            x = self.split(x, 0, grids)
        x = self.net["stem"](x)
        feats = []
        for index, stage in enumerate(STAGES, start=1):
            x = self.net[stage](x)
            feats.append(self.stitch(x, grids))
            if index in self.split_after and self.k > 1 and index < len(STAGES):
                x = self.split(x, index, grids)
        return feats

    @staticmethod
    def stitch(x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        for grid in reversed(grids):
            x = stitch_patches(x, grid)
        return x
