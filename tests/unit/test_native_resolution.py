"""Native resolution: how an image of any size and shape becomes the model input, training crops of it,
synthetic validation anomalies inside it, and maps and metrics at the ground truth's own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adps.config import ParamsError
from adps.data.datasets import LabelledDataset, TrainDataset, ValidationDataset
from adps.data.images import InputGeometry, load_mask, read_rgb
from adps.data.layout import Sample
from adps.evaluation.metrics import aupro, pixel_metrics
from adps.evaluation.predictions import predict_dataset
from adps.training.checkpoints import input_normalizer
from tests.conftest import tiny_params


@pytest.mark.parametrize(
    ("geometry", "image", "expected"),
    [
        (InputGeometry(128, "auto"), (128, 128), (128, 128)),  # the embedded squares: as before
        (InputGeometry(128, "auto"), (100, 90), (128, 128)),  # smaller than the input: resized up, as before
        (InputGeometry(128, "auto"), (230, 630), (230, 630)),  # larger on a side: its own size
        (InputGeometry(128, "auto"), (129, 64), (129, 64)),
        (InputGeometry(128, "resize"), (230, 630), (128, 128)),  # one setting away: today's squeeze
        (InputGeometry(128, "native"), (100, 90), (100, 90)),
        (InputGeometry(128, "native", 0.5), (1000, 750), (500, 375)),
        (InputGeometry(128, "auto", 0.25), (1001, 999), (250, 250)),  # round(250.25), round(249.75)
    ],
)
def test_the_input_size_of_an_image(geometry, image, expected):
    assert geometry.input_size(*image) == expected


def strip(tmp_path, width=96, height=160, seed=0) -> Sample:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    path = tmp_path / f"strip{seed}.png"
    Image.fromarray(pixels).save(path)
    return Sample("strip", "train", 0, "good", path, None)


def test_native_training_items_are_windows_of_the_image_at_its_own_scale(tmp_path):
    params = tiny_params(anomalies={"normal_prob": 1.0})  # no anomaly: each item is a plain window
    sample = strip(tmp_path)
    full = torch.from_numpy(read_rgb(sample.image_path, None)[0].transpose(2, 0, 1))
    normalize = input_normalizer(params)
    dataset = TrainDataset([sample], InputGeometry(64, "auto"), normalize, params.anomalies, seed=1)
    corners = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        window = dataset[0]["image"] * normalize.std + normalize.mean
        assert window.shape == (3, 64, 64)
        found = [
            (top, left)
            for top in range(160 - 64 + 1)
            for left in range(96 - 64 + 1)
            if torch.allclose(full[:, top : top + 64, left : left + 64], window, atol=1e-5)
        ]
        assert len(found) == 1  # a window of the image, pixel for pixel (not a resized copy)
        corners.add(found[0])
    assert len(corners) > 1  # a new window each epoch
    again = TrainDataset([sample], InputGeometry(64, "auto"), normalize, params.anomalies, seed=1)
    again.set_epoch(5)
    torch.testing.assert_close(again[0]["image"], dataset[0]["image"])  # seeded: reproducible


def test_a_side_shorter_than_the_training_input_is_padded_for_the_crop(tmp_path):
    params = tiny_params(anomalies={"normal_prob": 1.0})
    dataset = TrainDataset(
        [strip(tmp_path, width=40, height=200)], InputGeometry(64, "native"), input_normalizer(params),
        params.anomalies, seed=0,
    )  # fmt: skip
    assert dataset[0]["image"].shape == (3, 64, 64)


def test_validation_anomalies_on_a_large_image_lie_in_one_training_sized_window(tmp_path):
    params = tiny_params()
    sample = strip(tmp_path, width=96, height=200)
    dataset = ValidationDataset([sample], InputGeometry(64, "auto"), input_normalizer(params), params.anomalies, 3)
    normal, anomalous = dataset[0], dataset[1]
    assert normal["image"].shape == anomalous["image"].shape == (3, 200, 96)
    rows, cols = np.nonzero(anomalous["mask"][0].numpy())
    assert len(rows) and np.ptp(rows) < 64 and np.ptp(cols) < 64
    changed = (anomalous["image"] != normal["image"]).any(dim=0).numpy()
    assert not changed[anomalous["mask"][0].numpy() == 0].any()  # only the mask's pixels changed


def blank_maps(model, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in model: a map of the input's size, 1 in its top-left pixel."""
    maps = torch.zeros(image.shape[0], 1, *image.shape[-2:])
    maps[..., 0, 0] = 1.0
    return maps, maps.flatten(1).max(dim=1).values


@pytest.mark.parametrize("resolution", ["resize", "native"])
def test_maps_come_back_at_the_masks_own_size_in_every_mode(resolution, tmp_path):
    image_path = strip(tmp_path, width=96, height=160).image_path
    mask_path = tmp_path / "mask.png"
    mask = np.zeros((160, 96), np.uint8)
    mask[100:103, 10:60] = 255  # a 3 px scratch: at 64 x 64 it would be about one row
    Image.fromarray(mask).save(mask_path)
    samples = [Sample("strip", "test", 1, "scratch", image_path, mask_path)]
    dataset = LabelledDataset(samples, InputGeometry(64, resolution), input_normalizer(tiny_params()))
    assert dataset[0]["image"].shape == ((3, 64, 64) if resolution == "resize" else (3, 160, 96))
    pred = predict_dataset(torch.nn.Identity(), dataset, 4, torch.device("cpu"), map_fn=blank_maps)
    assert pred.maps[0].shape == pred.masks[0].shape == (160, 96)
    assert pred.masks[0].sum() == 150  # the ground truth as stored: 3 x 50 pixels
    np.testing.assert_array_equal(load_mask(mask_path, None) > 0, pred.masks[0])


def test_pixel_metrics_pool_images_of_different_sizes():
    """Two images, 2 x 3 and 4 x 1: their pixels pooled. Worked by hand: the three defect pixels score 0.9,
    0.8 and 0.3; of the seven normal ones only 0.4 outranks 0.3, so pixel AP = (1 + 1 + 3/4) / 3."""
    maps = [np.array([[0.9, 0.1, 0.2], [0.0, 0.4, 0.1]]), np.array([[0.8], [0.3], [0.2], [0.0]])]
    masks = [np.array([[1, 0, 0], [0, 0, 0]], bool), np.array([[1], [1], [0], [0]], bool)]
    metrics = pixel_metrics(maps, masks, 0.3)
    assert metrics["pixel_ap"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert metrics["pixel_auroc"] == pytest.approx(1 - 1 / 21)  # 21 (defect, normal) pairs, one misordered
    # AUPRO: regions of 1 px and 2 px; at FPR 0 the 0.9 and 0.8 pixels give PRO (1 + 1/2) / 2 = 0.75, at
    # FPR 1/7 (0.4) still 0.75, then 0.3 completes region 2: PRO 1 from FPR 1/7 on.
    expected = (0.75 * (1 / 7) + 1.0 * (0.3 - 1 / 7)) / 0.3
    assert aupro(maps, masks, 0.3) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("section", "message"),
    [({"data": {"resolution": "nativ"}}, "data.resolution"), ({"data": {"scale": 0}}, "data.scale")],
)
def test_a_bad_resolution_setting_names_its_key(section, message):
    with pytest.raises(ParamsError, match=message):
        tiny_params(**section)
