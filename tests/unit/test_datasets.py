import numpy as np
import pytest
import torch

from adps.data.datasets import LabelledDataset, TrainDataset
from adps.data.images import load_rgb
from adps.data.layout import build_sample_index
from adps.errors import ImageReadError
from adps.training.checkpoints import input_normalizer
from tests.conftest import tiny_params


@pytest.fixture
def samples(tiny_dataset_master):
    return build_sample_index(tiny_dataset_master / "fabric", "fabric")


def test_train_items_are_reproducible_per_epoch(samples):
    params = tiny_params(anomalies={"normal_prob": 0.0})
    train = [s for s in samples if s.split == "train"]
    ds = TrainDataset(train, 64, input_normalizer(params), params.anomalies, seed=3)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
    assert item["label"] == float(item["mask"].any())
    again = TrainDataset(train, 64, input_normalizer(params), params.anomalies, seed=3)[0]
    torch.testing.assert_close(item["image"], again["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["mask"], item["mask"]) or not torch.equal(ds[0]["image"], item["image"])


def test_train_images_are_normalised(samples):
    params = tiny_params(anomalies={"normal_prob": 1.0})
    item = TrainDataset(
        [s for s in samples if s.split == "train"], 64, input_normalizer(params), params.anomalies, seed=0
    )[0]
    raw = torch.from_numpy(load_rgb(samples[0].image_path, 64).transpose(2, 0, 1))
    # the default backbone (EfficientNet-Lite, TF-ported weights) sees (255 x - 127) / 128
    torch.testing.assert_close(item["image"], (raw * 255 - 127) / 128, atol=1e-5, rtol=0)


def test_test_items_carry_mask_label_and_path(samples):
    test = [s for s in samples if s.split == "test"]
    ds = LabelledDataset(test, 64, input_normalizer(tiny_params()))
    for i, s in enumerate(test):
        item = ds[i]
        assert item["path"] == str(s.image_path) and item["label"] == s.label
        assert bool(item["mask"].any()) == (s.label == 1)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="bad.png"):
        load_rgb(bad, 64)


def test_sixteen_bit_images_are_scaled(tmp_path):
    from PIL import Image

    path = tmp_path / "g16.png"
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(path)
    assert np.allclose(load_rgb(path, 8), 1.0)
