import numpy as np
import pytest

from adps.config import SyntheticParams
from adps.data.embedded import DEFECTS, RENDERERS, generate_category, generate_image, image_rng, sample_pose
from adps.data.layout import build_sample_index

CFG = SyntheticParams(image_size=64, n_train=3, n_test_good=2, n_test_defect=1)


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_image("wood", CFG, image_rng(1, "wood", "test", "crack", 0), "crack")
    b = generate_image("wood", CFG, image_rng(1, "wood", "test", "crack", 0), "crack")
    c = generate_image("wood", CFG, image_rng(2, "wood", "test", "crack", 0), "crack")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_normal_images_vary():
    imgs = [generate_image("washer", CFG, image_rng(0, "washer", "train", "good", i), None)[0] for i in range(3)]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2])


@pytest.mark.parametrize("category", sorted(RENDERERS))
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defect_masks_are_pixel_exact(category, defect):
    """Every changed pixel is in the mask, and (nearly) every mask pixel changed."""
    rng = np.random.default_rng(3)
    normal, region = RENDERERS[category](rng, 128, sample_pose(rng, SyntheticParams()))
    painted, mask = DEFECTS[defect](normal, region, np.random.default_rng(4))
    changed = np.any(np.abs(painted - normal) > 1e-9, axis=-1)
    assert mask.any()
    assert not np.any(changed & ~mask)
    assert changed.sum() >= 0.9 * mask.sum()
    assert not np.any(mask & ~region)


def test_category_layout_and_counts(tmp_path):
    generate_category("capsule", CFG, 0, tmp_path / "capsule")
    samples = build_sample_index(tmp_path / "capsule", "capsule")
    train = [s for s in samples if s.split == "train"]
    defects = [s for s in samples if s.label == 1]
    assert len(train) == 3 and all(s.label == 0 and s.mask_path is None for s in train)
    assert len(defects) == len(CFG.defect_kinds) and all(s.mask_path is not None for s in defects)
    assert {s.defect_type for s in defects} == set(CFG.defect_kinds)
