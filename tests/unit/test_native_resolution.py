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
from adps.model.network import ImageScorer
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
    stand_in = torch.nn.Module()
    stand_in.scorer = ImageScorer("max", 2.0, 100)
    pred = predict_dataset(stand_in, dataset, 4, torch.device("cpu"), map_fn=blank_maps)
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


def test_a_scaled_native_image_is_seen_smaller_and_answered_at_its_own_size(tmp_path):
    """data.scale 0.5: the model sees a 100 x 60 image as 50 x 30; the map and regions come back at 100 x 60."""
    from adps.inference import ImageSource, Predictor, TorchEngine
    from adps.training.checkpoints import build_model, model_spec

    params = tiny_params(data={"resolution": "native", "scale": 0.5}, model={"kind": "adps"})
    spec = model_spec(params)
    seen = []
    model = build_model(spec).eval()
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    engine = TorchEngine(model, spec, params.score.model_dump(), "cpu")
    predictor = Predictor(engine, {"image": 0.5, "pixel": 0.0, "score": params.score.model_dump()})
    path = strip(tmp_path, width=100, height=60).image_path
    result = predictor.predict_batch([ImageSource(str(path), path=path)])[0]
    assert seen == [(30, 50)] and result.anomaly_map.shape == (60, 100) and result.original_size == (100, 60)
    (region,) = predictor.regions(result)  # pixel threshold 0: the whole image is one region
    assert (region["x"], region["y"], region["width"], region["height"]) == (0, 0, 100, 60)


@pytest.mark.parametrize("height", [17, 16, 500])
def test_padding_mirrors_the_image_so_the_last_patches_show_texture_not_stripes(height):
    """Repeated edge pixels made the last rows of a 192 x 500 strip score as defects; a mirror continues the
    texture. The pad of a side of 16 px (half a 32 px patch) needs the mirror twice over."""
    from adps.model.network import AdpsModel

    model = AdpsModel("resnet18", 4, (0,), (8, 8), {"method": "max", "sigma": 2.0, "topk": 10}, input_size=128)
    image = torch.rand(1, 3, height, 45)
    expected = np.pad(image.numpy(), [(0, 0), (0, 0), (0, (-height) % 32), (0, (-45) % 32)], mode="symmetric")
    np.testing.assert_array_equal(model.pad(image).numpy(), expected)


@pytest.mark.parametrize(
    ("shape", "score", "problem"),
    [
        ((16, 129), {"method": "max", "sigma": 8.0, "topk": 100}, "needs more than 24 px on a side"),  # ceil(3 x 8)
        ((25, 129), {"method": "max", "sigma": 8.0, "topk": 100}, ""),
        ((16, 16), {"method": "max", "sigma": 2.0, "topk": 100}, ""),  # radius 6
        ((30, 30), {"method": "topk", "sigma": 0.0, "topk": 1000}, "fewer pixels than score.topk 1000"),  # 900
        ((40, 25), {"method": "topk", "sigma": 0.0, "topk": 1000}, ""),
    ],
)
def test_what_the_image_score_needs_of_a_map(shape, score, problem):
    from adps.model.network import score_input_problem

    found = score_input_problem(*shape, **score)
    assert (problem in found and found) if problem else found == ""


def test_an_image_too_small_for_the_score_gets_its_own_error_row(tmp_path):
    """score.sigma 8 (the tuning range's top) at scale 0.5: a 40 x 300 image is seen as 20 x 150 px, too
    narrow for the smoothing radius 24; it gets an error row and the other image is scored."""
    from adps.inference import ImageSource, Predictor, TorchEngine
    from adps.training.checkpoints import build_model, model_spec

    params = tiny_params(data={"resolution": "native", "scale": 0.5}, score={"sigma": 8.0}, model={"kind": "adps"})
    spec = model_spec(params)
    engine = TorchEngine(build_model(spec).eval(), spec, params.score.model_dump(), "cpu")
    predictor = Predictor(engine, {"image": 0.5, "pixel": 0.5, "score": params.score.model_dump()})
    small, fine = strip(tmp_path, width=40, height=300, seed=1).image_path, strip(tmp_path, seed=2).image_path
    results = predictor.predict_batch([ImageSource(str(p), path=p) for p in (small, fine)])
    assert "the model sees it as 20 x 150 px" in results[0].error and "score.sigma 8.0" in results[0].error
    assert results[1].error == "" and results[1].anomaly_map.shape == (160, 96)
