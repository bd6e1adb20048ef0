"""ONNX export: the whole inference path in one graph, matching PyTorch on real test images."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from scipy.stats import rankdata

from adps import paths, stages
from adps.errors import AdpsError
from adps.export import onnx_predictor
from adps.inference import Predictor, predict_to_folder
from tests.conftest import tiny_params

MAP_TOLERANCE = 1e-4  # max abs difference of anomaly maps in [0, 1] (float32 kernels differ in order)


@pytest.fixture(scope="module")
def exported(trained_project, tmp_path_factory):
    """A copy of the trained washer project with models/washer/model.onnx exported by the stage."""
    root = tmp_path_factory.mktemp("export") / "project"
    shutil.copytree(trained_project[0], root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = stages.export(tiny_params(), "washer")
    return root, result


def test_onnx_maps_and_scores_match_pytorch_on_test_images(exported):
    root, result = exported
    images = sorted((root / "data/synthetic/washer/test").rglob("*.png"))
    torch_results = Predictor.from_dir(root / "models/washer", "cpu").predict_paths(images)
    onnx_results = onnx_predictor(root / "models/washer").predict_paths(images)
    torch_maps = np.stack([r.anomaly_map for r in torch_results])
    onnx_maps = np.stack([r.anomaly_map for r in onnx_results])
    assert np.abs(torch_maps - onnx_maps).max() < MAP_TOLERANCE
    torch_scores = np.array([r.score for r in torch_results])
    onnx_scores = np.array([r.score for r in onnx_results])
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=MAP_TOLERANCE)
    assert (rankdata(onnx_scores) == rankdata(torch_scores)).all()
    assert [r.is_anomalous for r in onnx_results] == [r.is_anomalous for r in torch_results]
    assert result["onnx"] == str(paths.model_dir(tiny_params().at(root), "washer") / "model.onnx")


def test_onnx_file_documents_inputs_outputs_and_preprocessing(exported):
    root, _ = exported
    model = onnx.load(str(root / "models/washer/model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["image_size"] == "64" and meta["category"] == "washer" and "image_threshold" in meta
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "image_score"]
    assert (meta["resolution"], meta["scale"]) == ("auto", "1.0")
    batch, _, height, width = model.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param and height.dim_param and width.dim_param  # dynamic batch, height and width


def test_predict_with_the_onnx_runtime_writes_maps_and_error_rows(exported, tmp_path):
    root, _ = exported
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    shutil.copy(root / "data/synthetic/washer/test/good/000.png", inputs / "nested" / "a.png")
    (inputs / "broken.png").write_bytes(b"not an image")
    result = predict_to_folder(
        onnx_predictor(root / "models/washer"), inputs, tmp_path / "out", save_maps=tmp_path / "maps"
    )
    assert result["n_images"] == 2 and result["unreadable"] == [str(inputs / "broken.png")]
    assert np.load(tmp_path / "maps" / "nested" / "a.png.npy").shape == (64, 64)


def test_a_model_onnx_that_is_not_the_export_of_its_folder_is_refused(exported, tmp_path):
    """The graph scores as it was exported: another model's graph, or thresholds.json chosen for
    another psm.pt or rewritten with another scoring since, would give wrong decisions in silence."""
    import json

    root, _ = exported
    source = root / "models/washer"

    def folder(name: str, drop_psm: bool = False) -> tuple:
        copy = tmp_path / name
        shutil.copytree(source, copy)
        if drop_psm:
            (copy / "psm.pt").unlink()  # an ONNX-only deployment: model.onnx + thresholds.json
        return copy, json.loads((copy / "thresholds.json").read_text())

    alone, thresholds = folder("onnx_only", drop_psm=True)
    assert onnx_predictor(alone).thresholds == thresholds  # the export of this folder: accepted without psm.pt
    assert onnx_predictor(alone / "model.onnx").geometry.size == 64  # the file's folder, as for psm.pt
    foreign, thresholds = folder("foreign", drop_psm=True)
    (foreign / "thresholds.json").write_text(json.dumps({**thresholds, "checkpoint_sha256": "f" * 64}))
    with pytest.raises(AdpsError, match=r"not exported from this folder's model \(thresholds.json was chosen for"):
        onnx_predictor(foreign)
    rescored, thresholds = folder("rescored")
    score = {**thresholds["score"], "method": "topk"}  # what `adps evaluate` with other score params writes
    (rescored / "thresholds.json").write_text(json.dumps({**thresholds, "score": score}))
    with pytest.raises(AdpsError, match=r"thresholds.json has another score\): run `adps export` again"):
        onnx_predictor(rescored)
    damaged, _ = folder("damaged")
    (damaged / "model.onnx").write_text("not a graph")
    with pytest.raises(AdpsError, match=r"model.onnx is not a model.onnx written by `adps export`"):
        onnx_predictor(damaged)
