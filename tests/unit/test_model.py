from pathlib import Path

import pytest
import torch
import torchvision

from adps.model.backbones import Student, Teacher, split_into_patches, stitch_patches
from adps.model.network import AdpsModel, AdpsOutput, cosine_anomaly_map, weight_mask
from adps.model.weights import TeacherWeightsError, load_teacher_weights


def small_model(**kw) -> AdpsModel:
    scoring = {k: kw.pop(k) for k in ("method", "sigma", "topk") if k in kw}
    args = dict(backbone="resnet18", patches=4, split_after=(0,), psm_head_channels=(8, 8), input_size=128)
    scoring = {"method": "max", "sigma": 2.0, "topk": 10, **scoring}
    return AdpsModel(**{**args, **kw}, scoring=scoring)


def test_split_and_stitch_are_inverse_and_keep_positions():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches, grid = split_into_patches(x, 2)
    assert patches.shape == (32, 3, 2, 2) and grid == (4, 4)
    torch.testing.assert_close(patches[1 * 16 + 1 * 4 + 2], x[1, :, 2:4, 4:6])  # image 1, row 1, col 2
    torch.testing.assert_close(stitch_patches(patches, grid), x)


def test_a_non_square_map_is_cut_into_more_patches_of_the_same_size():
    x = torch.arange(1 * 2 * 4 * 12, dtype=torch.float32).view(1, 2, 4, 12)
    patches, grid = split_into_patches(x, 2)
    assert grid == (2, 6) and patches.shape == (12, 2, 2, 2)
    torch.testing.assert_close(patches[1 * 6 + 4], x[0, :, 2:4, 8:10])  # row 1, col 4
    torch.testing.assert_close(stitch_patches(patches, grid), x)


def test_student_sees_patches_independently():
    """Changing one patch of the input changes only that patch's student features (no context leak)."""
    torch.manual_seed(0)
    student = Student("resnet18", 4, (0,), 64).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :16, :16] += 1.0  # top-left patch only
    fx, fy = student(x), student(y)
    for level in range(3):
        diff = (fx[level] - fy[level]).abs().sum(dim=1)[0]
        h = diff.shape[0] // 4
        assert diff[:h, :h].sum() > 0
        assert diff[h:, :].sum() == 0 and diff[:, h:].sum() == 0


def test_on_a_larger_non_square_image_the_student_keeps_the_patch_size_it_trained_on():
    """Trained at 64 px with k = 4 (16 px patches), on 64 x 128 it sees 4 x 8 patches of 16 px: a change in
    one patch reaches only that patch's features, at every level; nested splits keep their sizes too."""
    torch.manual_seed(0)
    for split_after in ((0,), (0, 1)):
        student = Student("resnet18", 4, split_after, 64).eval()
        x = torch.randn(1, 3, 64, 128)
        y = x.clone()
        y[..., 16:32, 96:112] += 1.0  # patch (row 1, col 6)
        with torch.no_grad():
            fxs, fys = student(x), student(y)
        for fx, fy in zip(fxs, fys, strict=True):
            diff = (fx - fy).abs().sum(dim=1)[0]
            rows, cols = diff.shape[0] // 4, diff.shape[1] // 8
            assert diff.shape[1] == 2 * diff.shape[0]
            assert diff[rows : 2 * rows, 6 * cols : 7 * cols].sum() > 0
            diff[rows : 2 * rows, 6 * cols : 7 * cols] = 0
            assert diff.sum() == 0


def test_any_image_size_gives_a_map_of_that_size_and_the_padding_never_scores():
    model = small_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 50, 90))  # not whole 32 px patches: padded to 64 x 96, cropped back
    assert out.anomaly_map.shape == (2, 1, 50, 90) and out.image_score.shape == (2,)
    torch.testing.assert_close(out.image_score, model.scorer(out.anomaly_map))


def test_k1_is_plain_symmetric_distillation():
    torch.manual_seed(0)
    student = Student("resnet18", 1, (0,), 64).eval()
    teacher = Teacher("resnet18")
    teacher.net.load_state_dict(student.net.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for s, t in zip(student(x), teacher(x), strict=True):
        torch.testing.assert_close(s, t)


def test_teacher_is_frozen_and_always_eval():
    model = small_model()
    model.train()
    assert not model.teacher.training and not model.teacher.net.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_forward_returns_one_dataclass_in_every_mode():
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        assert isinstance(out, AdpsOutput)
        assert out.anomaly_map.shape == (2, 1, 64, 64) and out.logits.shape == (2, 2, 64, 64)
        assert out.image_score.shape == (2,)
        assert out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1
        assert [tuple(c.shape) for c in out.distill.cos_maps] == [(2, 1, 16, 16), (2, 1, 8, 8), (2, 1, 4, 4)]


def test_weight_mask_block():
    t = [torch.ones(1, 2, 2, 2)]
    w = [torch.tensor([[[[1.0, 0.0], [0.5, -1.0]]]])]
    torch.testing.assert_close(weight_mask(t, w)[0][0, 0], torch.tensor([[0.0, 1.0], [0.5, 2.0]]))


def test_cosine_map_ablation_shape():
    model = small_model()
    distill = model.distill(torch.randn(1, 3, 64, 64))
    assert cosine_anomaly_map(distill, (64, 64)).shape == (1, 1, 64, 64)


def test_topk_score_is_mean_of_top_pixels():
    model = small_model(method="topk", sigma=0.0, topk=2)
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, :3] = torch.tensor([0.2, 0.9, 0.7])
    assert model.scorer(m).item() == pytest.approx(0.8)


def test_teacher_weights_choices(tmp_path: Path, caplog):
    teacher = Teacher("resnet18")
    assert load_teacher_weights(teacher.net, "resnet18", "none").startswith("none")
    reference = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(reference, path)
    record = load_teacher_weights(teacher.net, "resnet18", str(path))
    assert record.startswith(f"file {path}")
    torch.testing.assert_close(teacher.net["layer2"][0].conv1.weight, reference["layer2.0.conv1.weight"])
    with pytest.raises(TeacherWeightsError, match="file not found"):
        load_teacher_weights(teacher.net, "resnet18", str(tmp_path / "missing.pth"))


def test_imagenet_offline_is_a_clear_error_and_auto_falls_back(monkeypatch, tmp_path, caplog):
    """The same path on every machine: an empty cache and a proxy that refuses connections make a real,
    failing download attempt, with or without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: weights must be downloaded
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: connection refused
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    teacher = Teacher("resnet18")
    with pytest.raises(TeacherWeightsError) as err:
        load_teacher_weights(teacher.net, "resnet18", "imagenet")
    assert "'none'" in str(err.value) and "'auto'" in str(err.value) and "file path" in str(err.value)
    assert "efficientnet_lite0" in str(err.value)
    record = load_teacher_weights(teacher.net, "resnet18", "auto")
    assert "random init" in record and "RANDOM INIT" in caplog.text
