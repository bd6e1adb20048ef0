"""Two-stage training, evaluation and checkpoints on the tiny dataset, through the stage functions."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from adps import paths, stages
from adps.errors import AdpsError
from adps.inference import Predictor
from adps.training.checkpoints import CheckpointError, input_normalizer, load_model, read_checkpoint
from tests.conftest import tiny_params


@pytest.fixture
def trained(trained_project):
    return trained_project


def test_stages_write_their_outputs(trained, monkeypatch):
    root, results = trained
    monkeypatch.chdir(root)
    for path in (
        paths.student_checkpoint(tiny_params(), "washer"),
        paths.psm_checkpoint(tiny_params(), "washer"),
        paths.thresholds_file(tiny_params(), "washer"),
        paths.metrics_file(tiny_params(), "washer"),
        paths.train_history(tiny_params(), "washer", "distill"),
        paths.train_history(tiny_params(), "washer", "psm"),
        paths.plots_dir(tiny_params(), "washer") / "pixel_roc.json",
    ):
        assert path.is_file(), path
    assert not paths.resume_checkpoint(paths.student_checkpoint(tiny_params(), "washer")).exists()
    history = json.loads(paths.train_history(tiny_params(), "washer", "distill").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and {"loss_distill", "lr", "seconds"} <= set(history[0])
    metrics = json.loads(paths.metrics_file(tiny_params(), "washer").read_text())
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "image_threshold"):
        assert key in metrics
    assert metrics["teacher_weights"].startswith("none")
    assert len(list(paths.heatmaps_dir(tiny_params(), "washer").glob("*.png"))) == 4
    assert results["evaluate"]["pixel_ap"] == metrics["pixel_ap"]


def test_checkpoint_alone_rebuilds_the_model(trained, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)
    payload = read_checkpoint(paths.psm_checkpoint(tiny_params(), "washer"))  # weights_only=True inside
    assert payload["spec"]["image_size"] == 64 and payload["versions"]["torch"] == str(torch.__version__)
    assert payload["teacher_weights"].startswith("none")
    model, _ = load_model(paths.psm_checkpoint(tiny_params(), "washer"))
    again, _ = load_model(paths.psm_checkpoint(tiny_params(), "washer"))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x).anomaly_map, again(x).anomaly_map)


def test_predictor_scores_match_evaluation(trained, monkeypatch):
    """The deployable model folder scores as an independently loaded checkpoint and as the evaluation stage."""
    from sklearn.metrics import roc_auc_score

    from adps.data.datasets import LabelledDataset
    from adps.data.splits import category_splits
    from adps.evaluation.predictions import predict_dataset

    root, _ = trained
    monkeypatch.chdir(root)
    predictor = Predictor.from_dir(paths.model_dir(tiny_params(), "washer"))
    model, _ = load_model(paths.psm_checkpoint(tiny_params(), "washer"))  # a second, independent copy of the weights
    model.set_scoring(**json.loads(paths.thresholds_file(tiny_params(), "washer").read_text())["score"])
    _, _, test = category_splits(tiny_params(), "washer")
    expected = predict_dataset(
        model, LabelledDataset(test, 64, input_normalizer(tiny_params())), 8, torch.device("cpu")
    )
    got = predictor.predict_paths([s.image_path for s in test])
    np.testing.assert_allclose([r.score for r in got], expected.scores, rtol=1e-5, atol=1e-6)
    metrics = json.loads(paths.metrics_file(tiny_params(), "washer").read_text())
    assert roc_auc_score(expected.labels, [r.score for r in got]) == pytest.approx(metrics["image_auroc"], abs=1e-9)


def test_psm_refuses_a_student_trained_with_other_model_params(trained, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)
    before = paths.psm_checkpoint(tiny_params(), "washer").read_bytes()
    with pytest.raises(CheckpointError, match=r"rerun `adps distill --category washer`"):
        stages.psm(tiny_params(model={"teacher_weights": "none", "patches": 2}), "washer")
    assert paths.psm_checkpoint(tiny_params(), "washer").read_bytes() == before


def test_missing_checkpoint_and_unknown_category_are_clear_errors(project):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: \S*/models/fabric/psm.pt"):
        stages.evaluate(tiny_params(), "fabric")
    with pytest.raises(AdpsError, match=r"unknown category 'bottle'; data.categories has: fabric, washer"):
        stages.distill(tiny_params(), "bottle")


def test_corrupt_checkpoint_is_a_clear_error(project):
    paths.psm_checkpoint(tiny_params(), "fabric").parent.mkdir(parents=True)
    paths.psm_checkpoint(tiny_params(), "fabric").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint \S*/models/fabric/psm.pt"):
        stages.evaluate(tiny_params(), "fabric")


def test_symmetric_and_joint_variants_train(project):
    params = tiny_params(
        model={"teacher_weights": "none", "patches": 1, "psm_head_channels": [8, 8]},
        train={"distill": {"epochs": 1}, "psm": {"epochs": 1, "joint": True}},
    )
    stages.distill(params, "fabric")
    result = stages.psm(params, "fabric")
    history = json.loads(paths.train_history(tiny_params(), "fabric", "psm").read_text())
    assert {"loss_distill", "loss_seg"} <= set(history[0]) and result["epochs"] == 1


def test_predict_cli_on_a_folder_with_one_corrupt_file(trained, tmp_path):
    root, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("good/000.png", "hole/000.png", "crack/000.png"):
        shutil.copy(root / "data/synthetic/washer/test" / name, inputs / name.replace("/", "_"))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    command = [
        sys.executable,
        "-m",
        "adps.cli",
        "predict",
        "--model",
        str(root / "models/washer"),
        "--input",
        str(inputs),
        "--output",
        str(tmp_path / "out"),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "broken.png" in out.stderr  # logged
    with open(tmp_path / "out/predictions.csv") as handle:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"good_000.png", "hole_000.png", "crack_000.png", "broken.png"}
    assert "cannot read image" in rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    threshold = json.loads((root / "models/washer/thresholds.json").read_text())["image"]
    for name in ("good_000.png", "hole_000.png", "crack_000.png"):
        assert rows[name]["error"] == "" and float(rows[name]["threshold"]) == pytest.approx(threshold)
        assert rows[name]["is_anomalous"] == str(float(rows[name]["score"]) >= threshold)
        assert rows[name]["heatmap"] == str(tmp_path / "out/heatmaps" / f"{name}.png")
        assert (tmp_path / "out/heatmaps" / f"{name}.png").is_file()
    assert json.loads(out.stdout)["n_unreadable"] == 1
