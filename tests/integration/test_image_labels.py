"""Defects labelled by image only: accepted by import and validation, image metrics from all of them,
pixel metrics only from the ones with a mask (and said so), nothing pixel-level when none has one.

Real files, the real stages (Great Expectations validation, training, evaluation), a real MLflow store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from adps import paths, stages
from adps.tracking.registry import maybe_promote
from tests.conftest import tiny_params
from tests.integration.test_import_rules import crack_mask, image


def parts_params(**sections):
    folder = {"test_normal_fraction": 0.2}
    data = {"source": "folder", "categories": ["parts"], "import_path": "src", "folder": folder}
    return tiny_params(data=data, **sections)


@pytest.fixture
def parts(project):
    """``src/parts``: 14 normal images, three defects of which a0 and a1 have masks and a2 has none."""
    source = project / "src" / "parts"
    for i in range(14):
        image(source / "normal" / f"n{i}.png")
    for name in ("a0", "a1", "a2"):
        image(source / "anomalous" / f"{name}.png")
    for name in ("a0", "a1"):
        crack_mask(source / "masks" / f"{name}_mask.png")
    return source


def test_defects_without_masks_train_evaluate_and_register_with_image_metrics(parts, project, tmp_path, monkeypatch):
    params = parts_params(evaluation={"n_heatmaps": 8})  # every test image gets a heatmap
    stages.prepare(params)
    checked = stages.validate(params, "parts")
    assert checked["defects_without_mask"].startswith("1 of 3 defect images have no mask")
    summary = json.loads(paths.validation_summary(params, "parts").read_text())
    assert summary["counts"][0]["n_test_defect_without_mask"] == 1
    for stage in (stages.distill, stages.psm, stages.evaluate):
        stage(params, "parts")
    mixed = json.loads(paths.metrics_file(params, "parts").read_text())
    assert (mixed["n_test_anomalous"], mixed["n_test_anomalous_masked"]) == (3, 2)
    assert all(isinstance(mixed[k], float) for k in ("image_auroc", "pixel_ap", "aupro", "pixel_f1_at_threshold"))
    rows, notes = stages.summarize(params)
    assert rows["parts"]["pixel_ap"] == mixed["pixel_ap"]
    assert notes == {"parts": "Pixel metrics over the 2 of 3 defect images that have a mask; image metrics over all."}

    for mask in (parts / "masks").iterdir():  # now no defect has a mask: the same model, image labels only
        mask.unlink()
    stages.prepare(params)
    assert stages.validate(params, "parts")["defects_without_mask"].startswith("3 of 3")
    stages.evaluate(params, "parts")
    image_only = json.loads(paths.metrics_file(params, "parts").read_text())
    pixel = [k for k in image_only if k.startswith("pixel_") and k != "pixel_threshold"] + ["aupro"]
    assert len(pixel) == 8 and all(image_only[k] is None for k in pixel)  # missing, never 0
    assert image_only["image_auroc"] == mixed["image_auroc"] and image_only["n_test_anomalous_masked"] == 0
    assert stages.summarize(params)[0]["parts"]["pixel_ap"] is None
    [panel, *_] = sorted(paths.heatmaps_dir(params, "parts").glob("*_anomalous_*.png"))
    truth = np.asarray(Image.open(panel).convert("L"))[:64, 68:132]  # image | gap | ground truth (64 px tiles)
    assert (truth == 127).all()  # grey: the mask is unknown, not "no defect" (black)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    record = stages.register(params, "parts")
    run = MlflowClient(uri).get_run(record["run_id"])
    assert "image_auroc" in run.data.metrics and not any(k in run.data.metrics for k in pixel)
    page = MlflowClient(uri, registry_uri=uri).get_model_version("adps-parts", record["version"]).description
    assert "Image metrics only: none of the 3 defect images has a mask" in page
    assert "| pixel_ap | - |" in page


@pytest.mark.parametrize(("challenger_auroc", "promoted"), [(0.9, True), (0.6, False)])
def test_auto_promotion_compares_image_auroc_when_the_challenger_has_no_pixel_metric(
    tmp_path, challenger_auroc, promoted
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("adps-parts")
    champion = client.create_model_version(
        "adps-parts", str(tmp_path), tags={"pixel_ap": "0.5", "image_auroc": "0.7"}
    ).version
    client.set_registered_model_alias("adps-parts", "champion", champion)
    tags = {"pixel_ap": "None", "image_auroc": str(challenger_auroc)}  # as registered from image labels only
    challenger = client.create_model_version("adps-parts", str(tmp_path), tags=tags).version
    params = parts_params(registry={"auto_promote": True, "promote_metric": "pixel_ap"})
    assert maybe_promote(client, params, "adps-parts", challenger) is promoted
    expected = challenger if promoted else champion
    assert client.get_model_version_by_alias("adps-parts", "champion").version == expected


def test_an_unmasked_defect_does_not_enter_the_pixel_curves():
    from adps.evaluation.predictions import Predictions
    from adps.evaluation.reports import curve_data

    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = True
    test = Predictions(
        maps=np.stack([np.eye(4), np.ones((4, 4))]).astype(np.float32),
        scores=np.array([0.5, 1.0]),
        masks=masks,
        labels=np.array([1, 1]),
        paths=["a", "b"],
        masked=np.array([True, False]),
    )
    data = curve_data(test, 50)
    # pixels of image a only: 4 on the diagonal at 1.0 (one of them the defect), 12 at 0.0
    assert data["pixel_roc"][-1] == {"fpr": 1.0, "tpr": 1.0}
    assert min(p["precision"] for p in data["pixel_pr"] if p["recall"] == 1.0) == pytest.approx(1 / 16)
    assert max(p["precision"] for p in data["pixel_pr"] if p["recall"] == 1.0) == pytest.approx(1 / 4)
