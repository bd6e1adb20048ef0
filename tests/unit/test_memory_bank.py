"""The memory bank's pieces on hand-worked cases: nearest distances, coreset coverage, feature stacking."""

import torch

from adps.model.memory_bank import NearestNeighbourMap, greedy_coreset, position_features


def test_nearest_distance_per_position_is_exact():
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # four positions of one 2x2 map: (0,0) and (3,4) are in the bank, (6,8) is 5 from (3,4), (1,0) is 1 from (0,0)
    feats = torch.tensor([[[0.0, 3.0], [6.0, 1.0]], [[0.0, 4.0], [8.0, 0.0]]]).unsqueeze(0)
    expected = torch.tensor([[[[0.0, 0.0], [5.0, 1.0]]]])
    assert torch.allclose(NearestNeighbourMap(bank)(feats), expected, atol=1e-5)
    assert torch.allclose(NearestNeighbourMap(bank, chunk=3)(feats), expected, atol=1e-5)  # across chunks


def test_the_coreset_keeps_an_outlier_and_covers_every_point():
    points = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
    for seed in range(6):  # whichever point comes first, the farthest one (100) is taken
        assert 3 in greedy_coreset(points, 2, projection_dim=8, seed=seed).tolist()
    cloud = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    kept = cloud[greedy_coreset(cloud, 50, projection_dim=16, seed=0)]
    radius = torch.cdist(cloud, kept).min(dim=1).values.max()
    random_radius = torch.cdist(cloud, cloud[:50]).min(dim=1).values.max()
    assert radius < random_radius  # k-center covers the cloud more tightly than the same number of random rows
    assert greedy_coreset(cloud, 600, projection_dim=4, seed=0).tolist() == list(range(500))  # nothing to thin


def test_position_features_stack_levels_at_the_first_levels_resolution():
    feats = [torch.zeros(2, 24, 16, 16), torch.ones(2, 40, 8, 8), torch.full((2, 112, 4, 4), 2.0)]
    stacked = position_features(feats, (1, 2))
    assert stacked.shape == (2, 152, 8, 8)
    assert stacked[:, :40].eq(1).all() and stacked[:, 40:].eq(2).all()
