"""The memory bank and the model kinds: hand-worked distances, coreset cover, combined score, kind choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adps.config import ThresholdParams
from adps.data.datasets import split_held_out
from adps.data.layout import Sample
from adps.evaluation.kinds import auroc_standard_error, choose_kind, normal_stats
from adps.evaluation.predictions import Predictions
from adps.evaluation.reports import calibrate
from adps.model.memory_bank import MemoryBank, NearestNeighbourMap, build_bank, greedy_coreset
from adps.model.network import ADPS, COMBINED, MEMORY_BANK, AdpsModel

SCORE = {"method": "max", "sigma": 0.0, "topk": 1}


def test_nearest_neighbour_distance_by_hand():
    # query (3, 0): 3 from (0, 0), 4 from (3, 4) -> 3; query (3, 5): 1 from (3, 4)
    search = NearestNeighbourMap(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    query = torch.tensor([[3.0, 3.0], [0.0, 5.0]]).view(1, 2, 1, 2)  # (B=1, C=2, h=1, w=2): (3, 0) and (3, 5)
    torch.testing.assert_close(search(query).flatten(), torch.tensor([3.0, 1.0]))


def test_the_greedy_coreset_keeps_the_far_point_whatever_the_start():
    features = torch.tensor([[0.0], [1.0], [10.0]])
    for seed in range(5):
        kept = set(greedy_coreset(features, 2, projection_dim=8, seed=seed).tolist())
        assert 2 in kept and len(kept & {0, 1}) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_coreset_is_the_same_on_a_gpu():
    features = torch.randn(500, 200, generator=torch.Generator().manual_seed(0))
    on_cpu = greedy_coreset(features, 50, projection_dim=16, seed=3)
    torch.testing.assert_close(greedy_coreset(features.cuda(), 50, projection_dim=16, seed=3).cpu(), on_cpu)


def test_the_bank_map_is_distance_over_distance_plus_scale():
    bank = MemoryBank(channels=2, levels=(0,), neighbourhood=1)
    bank.search.fill(torch.tensor([[0.0, 0.0]]))
    bank.scale = torch.tensor(1.0)
    feats = [torch.tensor([3.0, 4.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)]  # distance 5 everywhere
    torch.testing.assert_close(bank(feats, (4, 4)), torch.full((1, 1, 4, 4), 5 / 6))


def test_an_empty_bank_is_a_clear_error():
    bank = MemoryBank(channels=2, levels=(0,), neighbourhood=1)
    with pytest.raises(ValueError, match="memory bank is empty.*adps distill"):
        bank([torch.zeros(1, 2, 2, 2)], (4, 4))


def combined_model() -> AdpsModel:
    torch.manual_seed(0)
    model = AdpsModel("resnet18", 2, (0,), (8, 8), SCORE, kind=COMBINED).eval()
    images = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    build_bank(model.memory, model.teacher, images[:1], images[1:], 0.5, 100, 16, seed=0)
    return model


def test_a_saved_bank_loads_into_a_freshly_built_model():
    model = combined_model()
    fresh = AdpsModel("resnet18", 2, (0,), (8, 8), SCORE, kind=COMBINED)
    fresh.load_state_dict(model.state_dict())
    # half of 2 images x 8 x 8 positions; layer2 + layer3 channels
    assert fresh.memory.search.bank.shape == model.memory.search.bank.shape == (64, 128 + 256)
    torch.testing.assert_close(fresh.memory.scale, model.memory.scale)


def test_the_combined_score_is_the_sum_of_the_standardised_parts():
    model, image = combined_model(), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        adps = model.set_scoring(**SCORE, kind=ADPS)(image)
        bank = model.set_scoring(**SCORE, kind=MEMORY_BANK)(image)
        stats = {ADPS: [0.5, 0.25], MEMORY_BANK: [0.1, 2.0]}
        combined = model.set_scoring(**SCORE, kind=COMBINED, normal_stats=stats)(image)
    expected = (adps.image_score - 0.5) / 0.25 + (bank.image_score - 0.1) / 2.0
    torch.testing.assert_close(combined.image_score, expected)
    torch.testing.assert_close(combined.anomaly_map, adps.anomaly_map)  # the pixels are ADPS's
    assert bank.logits is None and bank.distill is None and float(bank.anomaly_map.max()) < 1


def test_a_model_answers_only_as_a_kind_it_holds():
    model = AdpsModel("resnet18", 2, (0,), (8, 8), SCORE, kind=MEMORY_BANK)
    assert not hasattr(model, "student") and not hasattr(model, "psm")
    with pytest.raises(ValueError, match="built as memory_bank cannot answer as adps"):
        model.set_scoring(**SCORE, kind=ADPS)


def predictions(scores, labels, synthetic) -> Predictions:
    n = len(scores)
    return Predictions(
        np.zeros((n, 2, 2), np.float32),
        np.asarray(scores, float),
        np.zeros((n, 2, 2), bool),
        np.asarray(labels),
        [str(i) for i in range(n)],
        np.ones(n, bool),
        np.asarray(synthetic, bool),
    )


# validation: 2 normals, 2 synthetic anomalies, 2 real defects
LABELS, SYNTHETIC = [0, 0, 1, 1, 1, 1], [False, False, True, True, False, False]


def test_the_kind_is_chosen_on_the_real_defects_only():
    val = {
        ADPS: predictions([0.1, 0.2, 0.9, 0.9, 0.15, 0.05], LABELS, SYNTHETIC),  # synthetic 1, real 1/4 pairs
        MEMORY_BANK: predictions([0.1, 0.2, 0.1, 0.1, 0.5, 0.6], LABELS, SYNTHETIC),  # real AUROC 1
        COMBINED: predictions([0.1, 0.2, 0.5, 0.5, 0.3, 0.15], LABELS, SYNTHETIC),  # real 0.15 < 0.2: AUROC 0.75
    }
    kind, why = choose_kind("auto", val)
    assert kind == MEMORY_BANK  # AUROC 1 has standard error 0: only the best is within it
    aurocs = "adps 0.250, memory_bank 1.000, adps+memory_bank 0.750"
    assert why == (
        "auto: the simplest kind within one standard error (0.000) of the best validation image AUROC "
        f"on 2 real defects and 2 normal images ({aurocs})"
    )
    assert choose_kind(ADPS, val) == (ADPS, "model.kind")
    without_real = {k: predictions(p.scores[:4], LABELS[:4], SYNTHETIC[:4]) for k, p in val.items()}
    assert choose_kind("auto", without_real) == (ADPS, "auto: the default (the validation split has no real defects)")


def test_a_more_complex_kind_must_beat_a_simpler_one_by_a_standard_error():
    # real defects vs normals [0.1, 0.2]: combination [0.15, 0.25] -> 3 of 4 pairs (0.75), bank [0.15, 0.15] -> 0.5
    val = {
        ADPS: predictions([0.1, 0.2, 0.9, 0.9, 0.15, 0.05], LABELS, SYNTHETIC),  # 0.25
        MEMORY_BANK: predictions([0.1, 0.2, 0.1, 0.1, 0.15, 0.15], LABELS, SYNTHETIC),  # 0.5
        COMBINED: predictions([0.1, 0.2, 0.5, 0.5, 0.15, 0.25], LABELS, SYNTHETIC),  # 0.75
    }
    # Hanley & McNeil at A = 0.75, 2 + 2 images: Q1 = 0.75 / 1.25 = 0.6, Q2 = 2 x 0.5625 / 1.75 = 0.642857;
    # SE^2 = (0.75 x 0.25 + (0.6 - 0.5625) + (0.642857 - 0.5625)) / 4 = 0.076339, SE = 0.2763
    assert auroc_standard_error(0.75, 2, 2) == pytest.approx(0.2763, abs=1e-4)
    kind, why = choose_kind("auto", val)
    assert kind == MEMORY_BANK and "within one standard error (0.276)" in why  # 0.5 >= 0.75 - 0.276
    val[MEMORY_BANK] = predictions([0.1, 0.2, 0.1, 0.1, 0.15, 0.05], LABELS, SYNTHETIC)  # 0.25: out of reach
    assert choose_kind("auto", val)[0] == COMBINED  # and ADPS (0.25) is out of reach too


def test_tuning_sees_the_normals_and_synthetic_anomalies_only():
    pred = predictions([0.1, 0.2, 0.9, 0.95, 0.3, 0.5], LABELS, SYNTHETIC)
    assert pred.synthetic_split().scores.tolist() == [0.1, 0.2, 0.9, 0.95]  # normal, normal, then their copies
    assert pred.real().scores.tolist() == [0.1, 0.2, 0.3, 0.5]


def test_normal_statistics_come_from_real_normal_images():
    val = {k: predictions([0.1, 0.3, 0.9, 0.9, 0.8, 0.8], LABELS, SYNTHETIC) for k in (ADPS, MEMORY_BANK)}
    assert normal_stats(val)[ADPS] == pytest.approx([0.2, 0.1])


def test_the_image_threshold_comes_from_real_defects_when_there_are_any():
    # F1-optimal: on normals + real defects, 0.3 separates them (F1 1); on normals + synthetic, 0.9 does
    with_real = predictions([0.1, 0.2, 0.9, 0.95, 0.3, 0.5], LABELS, SYNTHETIC)
    thresholds = calibrate(with_real, ThresholdParams(), SCORE)
    assert thresholds["image"] == pytest.approx(0.3)
    assert thresholds["image_threshold_on"] == "real defects: 2 labelled defect images and 2 normal images"
    synthetic_only = predictions([0.1, 0.2, 0.9, 0.95], LABELS[:4], SYNTHETIC[:4])
    thresholds = calibrate(synthetic_only, ThresholdParams(), SCORE)
    assert thresholds["image"] == pytest.approx(0.9)
    assert thresholds["image_threshold_on"] == "synthetic anomalies on 2 held-out normal images"


def test_the_held_out_share_of_defects_is_per_type_and_seeded(tmp_path):
    def sample(defect_type: str, i: int) -> Sample:
        return Sample("c", "test", 1, defect_type, tmp_path / f"{defect_type}{i}.png", None)

    samples = [sample("crack", i) for i in range(5)] + [sample("hole", 0)]
    held = split_held_out(samples, 0.4, seed=3)
    assert len(held) == 2 and {s.defect_type for s in held} == {"crack"}  # round(5 x 0.4); a lone hole stays in test
    assert held == split_held_out(samples, 0.4, seed=3) and held != split_held_out(samples, 0.4, seed=4)
