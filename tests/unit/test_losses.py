import math

import pytest
import torch

from adps.model.losses import distillation_loss, focal_loss, level_mask


def feats(vectors):
    """(B=1, C, 1, len) feature map from a list of C-dim vectors (one per position)."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, len(vectors[0]), 1, len(vectors))


def test_distillation_pulls_on_normal_and_pushes_on_anomalous_positions():
    t = feats([[1.0, 0.0], [1.0, 0.0]])
    s = feats([[0.0, 1.0], [1.0, 1.0]])  # cos = 0 at position 0, 1/sqrt(2) at position 1
    mask = torch.tensor([[[[0.0, 1.0]]]])  # position 1 anomalous
    # position 0: (1 - 0) = 1 (pull); position 1: max(cos, 0) = 0.7071 (push); mean over 2 positions
    expected = (1.0 + 1 / math.sqrt(2)) / 2
    got = distillation_loss([t], [s], mask, push_weight=1.0, push_floor=0.0, mask_threshold=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_push_floor_and_weight():
    t = feats([[1.0, 0.0]])
    s = feats([[-1.0, 0.0]])  # cos = -1
    anomalous = torch.ones(1, 1, 1, 1)
    assert distillation_loss([t], [s], anomalous, 1.0, 0.0, 0.5).item() == pytest.approx(0.0)
    assert distillation_loss([t], [s], anomalous, 2.0, None, 0.5).item() == pytest.approx(-2.0)


def test_levels_are_summed_and_mask_is_resized():
    t1, s1 = torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)  # cos = 1 everywhere
    t2, s2 = torch.ones(1, 3, 2, 2), -torch.ones(1, 3, 2, 2)  # cos = -1 everywhere
    mask = torch.zeros(1, 1, 8, 8)
    # level 1: pull 0; level 2: pull (1 - (-1)) = 2
    assert distillation_loss([t1, t2], [s1, s2], mask, 1.0, 0.0, 0.5).item() == pytest.approx(2.0)
    mask[..., :4, :] = 1.0
    assert level_mask(mask, (2, 2), 0.5).tolist() == [[[1.0, 1.0], [0.0, 0.0]]]


def test_focal_loss_hand_computed():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # p(normal) = e^2 / (e^2 + 1)
    p = math.exp(2) / (math.exp(2) + 1)
    normal, anomalous = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    assert focal_loss(logits, normal, 0.0, None).item() == pytest.approx(-math.log(p), rel=1e-5)
    assert focal_loss(logits, normal, 2.0, None).item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)
    expected = -0.25 * (p**2) * math.log(1 - p)
    assert focal_loss(logits, anomalous, 2.0, 0.25).item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_matches_cross_entropy_at_gamma_zero():
    logits = torch.randn(2, 2, 5, 5)
    mask = (torch.rand(2, 1, 5, 5) > 0.5).float()
    ce = torch.nn.functional.cross_entropy(logits, mask[:, 0].long())
    torch.testing.assert_close(focal_loss(logits, mask, 0.0, None), ce)
