import numpy as np
import pytest
from PIL import Image

from adps.config import AnomalyParams
from adps.data.anomalies import AnomalySynthesizer, perlin_mask, perlin_noise
from adps.errors import DatasetError


def image(seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)


def test_mask_is_binary_and_image_changed_only_inside():
    synth = AnomalySynthesizer(AnomalyParams(normal_prob=0.0, n_procedural_textures=3), 64, seed=1)
    drawn = 0
    for seed in range(12):
        normal = image(seed)
        anomalous, mask = synth(normal, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (64, 64)
        np.testing.assert_array_equal(anomalous[~mask], normal[~mask])
        if mask.any():  # an empty Perlin mask is allowed, and then nothing may change
            drawn += 1
            assert not np.allclose(anomalous[mask], normal[mask])
    assert drawn >= 8, f"only {drawn} of 12 draws had an anomaly"


def test_same_seed_same_output_and_other_seed_differs():
    cfg = AnomalyParams(normal_prob=0.0, n_procedural_textures=3)
    a = AnomalySynthesizer(cfg, 64, seed=1)(image(), np.random.default_rng(5))
    b = AnomalySynthesizer(cfg, 64, seed=1)(image(), np.random.default_rng(5))
    c = AnomalySynthesizer(cfg, 64, seed=1)(image(), np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_blend_follows_the_draem_formula():
    """Inside the mask, the result lies between the image and the texture (beta-blend)."""
    synth = AnomalySynthesizer(AnomalyParams(normal_prob=0.0, beta_max=0.5, n_procedural_textures=1), 64, 0)
    normal = np.zeros((64, 64, 3), np.float32)
    texture = synth.textures[0]
    drawn = 0
    for seed in range(8):
        anomalous, mask = synth(normal, np.random.default_rng(seed))
        if mask.any():
            drawn += 1
            ratio = anomalous[mask] / np.maximum(texture[mask], 1e-6)
            valid = texture[mask] > 0.05
            assert valid.sum() > 0.5 * mask.sum()
            assert np.all((ratio[valid] > 0.5 - 1e-4) & (ratio[valid] <= 1 + 1e-4))
    assert drawn >= 5, f"only {drawn} of 8 draws had an anomaly"


def test_normal_prob_one_leaves_image_untouched():
    synth = AnomalySynthesizer(AnomalyParams(normal_prob=1.0, n_procedural_textures=1), 64, 0)
    normal = image()
    out, mask = synth(normal, np.random.default_rng(0))
    assert not mask.any()
    np.testing.assert_array_equal(out, normal)


def test_texture_dir_is_used(tmp_path):
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "t.png")
    synth = AnomalySynthesizer(AnomalyParams(normal_prob=0.0, beta_max=0.0001, texture_dir=tmp_path), 64, 0)
    for seed in range(10):
        out, mask = synth(np.zeros((64, 64, 3), np.float32), np.random.default_rng(seed))
        if mask.any():
            assert np.allclose(out[mask], 200 / 255, atol=0.01)
            return
    pytest.fail("no anomaly drawn in 10 tries")


def test_empty_texture_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"texture_dir has no images.*set it to null"):
        AnomalySynthesizer(AnomalyParams(texture_dir=tmp_path), 64, 0)


def test_perlin_noise_range_and_mask_coverage():
    noise = perlin_noise((64, 64), (4, 8), np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= 1.0 + 1e-6
    coverage = [perlin_mask(64, AnomalyParams(), np.random.default_rng(s)).mean() for s in range(30)]
    assert 0.0 < np.mean(coverage) < 0.5
