"""The model kinds beside ADPS, for real: the memory bank and the combination through the Prefect flow,
DVC, ONNX and the model served over REST; ``model.kind: auto`` choosing the kind and the image threshold
on real validation defects. (Every other test trains with ``auto`` and no real defects: ADPS ships.)
"""

from __future__ import annotations

import base64
import json
import urllib.request

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from adps import paths, stages
from adps.config import load_params, override_params
from adps.errors import AdpsError
from adps.evaluation.kinds import SIMPLEST_FIRST, auroc_standard_error
from adps.export import onnx_predictor
from adps.inference import Predictor
from adps.training.checkpoints import CheckpointError
from flows.pipeline import adps_pipeline
from tests.conftest import make_dvc_project, output_digests, project_env, run, tiny_params, write_params
from tests.servers import free_port, start, stop, wait_until_up

MAP_TOLERANCE = 1e-3  # the bank's distances cancel large terms (|q|² - 2 q·b + |b|²); ADPS agrees to 1e-4


@pytest.mark.parametrize("kind", ["memory_bank", "adps+memory_bank"])
def test_each_kind_runs_through_the_flow_and_dvc_and_serves_like_adps(kind, tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    env = project_env(root)
    make_dvc_project(root, env, model={"kind": kind})
    monkeypatch.chdir(root)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        rows = adps_pipeline(params_path="params.yaml")
    assert rows[0]["status"] == "retrained" and rows[0]["ran"] == "validate, distill, psm, evaluate, export, register"
    assert "up to date" in run(["dvc", "status"], root, env)  # what the flow wrote is what DVC versions
    flow_outputs = output_digests(root)
    run(["dvc", "repro", "--force"], root, env)  # the other front-end, every stage again: the same bytes
    assert output_digests(root) == flow_outputs

    params = load_params(root / "params.yaml")
    metrics = json.loads(paths.metrics_file(params, "washer").read_text())
    assert (metrics["kind"], metrics["kind_choice"]) == (kind, "model.kind")
    checkpoint = torch.load(paths.psm_checkpoint(params, "washer"), weights_only=True)
    parts = {key.split(".")[0] for key in checkpoint["state"]}
    thresholds = json.loads(paths.thresholds_file(params, "washer").read_text())
    if kind == "memory_bank":
        assert list(metrics["kinds"]) == ["memory_bank"] and parts == {"teacher", "memory"}  # nothing trained
        assert json.loads(paths.train_history(params, "washer", "distill").read_text()) == []
    else:
        assert set(metrics["kinds"]) == {"adps", "memory_bank", "adps+memory_bank"}
        assert parts == {"teacher", "student", "psm", "memory"}
        assert set(thresholds["score"]["normal_stats"]) == {"adps", "memory_bank"}  # baked into model.onnx too

    images = sorted(paths.category_dir(params, "washer").glob("test/*/*.png"))
    local = Predictor.from_dir(paths.model_dir(params, "washer"), "cpu").predict_paths(images)
    exported = onnx_predictor(paths.model_dir(params, "washer")).predict_paths(images)
    differences = [np.abs(a.anomaly_map - b.anomaly_map).max() for a, b in zip(local, exported, strict=True)]
    assert max(differences) < MAP_TOLERANCE
    np.testing.assert_allclose([b.score for b in exported], [a.score for a in local], atol=MAP_TOLERANCE)
    assert [b.is_anomalous for b in exported] == [a.is_anomalous for a in local]

    uri = f"sqlite:///{root / 'mlflow.db'}"
    port, log = free_port(), tmp_path / "serve.log"
    serve = ["mlflow", "models", "serve", "-m", "models:/adps-washer@challenger", "--env-manager", "local"]
    server = start([*serve, "--host", "127.0.0.1", "-p", str(port)], root, {**env, "MLFLOW_TRACKING_URI": uri}, log)
    try:  # the served model, over REST as a line camera calls it
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log, timeout=180)
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            json.dumps({"instances": encoded}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.load(response)["predictions"]
    finally:
        stop(server)
    np.testing.assert_allclose([row["score"] for row in served], [a.score for a in local], rtol=1e-5)
    assert [row["is_anomalous"] for row in served] == [a.is_anomalous for a in local]
    page = MlflowClient(uri, registry_uri=uri).get_model_version("adps-washer", "1").description
    assert f"**Model kind**: {kind} (model.kind)." in page


def test_auto_chooses_the_kind_and_the_image_threshold_on_real_validation_defects(project):
    sections = {
        "data": {"categories": ["washer"], "image_size": 64, "val_defect_fraction": 0.5},
        "synthetic": {"n_test_defect": 2},  # 2 per defect kind: one of each (5) goes to validation
    }
    write_params(project, **sections)
    params = tiny_params(**sections).at(project)
    stages.prepare(params)
    for stage in (stages.distill, stages.psm, stages.evaluate):
        stage(params, "washer")
    metrics = json.loads(paths.metrics_file(params, "washer").read_text())
    thresholds = json.loads(paths.thresholds_file(params, "washer").read_text())
    assert metrics["kind_choice"].startswith("auto: the simplest kind within one standard error (")
    assert "on 5 real defects and 2 normal images (adps " in metrics["kind_choice"]
    assert set(metrics["kinds"]) == {"adps", "memory_bank", "adps+memory_bank"}
    val_auroc = {kind: row["val_image_auroc"] for kind, row in metrics["kinds"].items()}
    reach = max(val_auroc.values()) - auroc_standard_error(max(val_auroc.values()), 5, 2)
    assert metrics["kind"] == next(kind for kind in SIMPLEST_FIRST if val_auroc[kind] >= reach)
    # 10 training normals: round(1.5) = 2 held out; 2 x 5 defects: 5 held out, 5 stay in test
    assert thresholds["image_threshold_on"] == "real defects: 5 labelled defect images and 2 normal images"
    assert metrics["image_threshold_on"] == thresholds["image_threshold_on"]
    assert metrics["n_test_anomalous"] == 5 and metrics["n_test"] == 5 + 2
    assert thresholds["score"]["kind"] == metrics["kind"]
    predictor = Predictor.from_dir(paths.model_dir(params, "washer"), "cpu")
    assert predictor.engine.model.answer == metrics["kind"]  # the shipped model answers as the chosen kind

    other = "memory_bank" if metrics["kind"] != "memory_bank" else "adps"
    with pytest.raises(CheckpointError, match=rf"model\.kind: checkpoint 'auto', params '{other}'"):
        stages.evaluate(override_params(params, {"model.kind": other}), "washer")  # the key that differs, named
    broken = {**thresholds, "score": {**thresholds["score"], "kind": "patchcore"}}
    paths.thresholds_file(params, "washer").write_text(json.dumps(broken))
    with pytest.raises(AdpsError, match="thresholds.json has a score this psm.pt cannot use.*run `adps evaluate`"):
        Predictor.from_dir(paths.model_dir(params, "washer"), "cpu")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"model": {"kind": "patchcore"}}, "model.kind"),
        ({"model": {"memory_bank": {"neighbourhood": 2}}}, "neighbourhood must be odd"),
        ({"model": {"memory_bank": {"levels": [2, 1]}}}, "levels must be increasing"),
        ({"data": {"val_defect_fraction": 1.0}}, "data.val_defect_fraction"),
        ({"tune": {"space": {"model.kind": {"type": "categorical", "choices": ["adps"]}}}}, "model.kind"),
        ({"tune": {"space": {"data.val_defect_fraction": {"type": "float", "low": 0.1, "high": 0.5}}}}, "val_defect"),
    ],
)
def test_a_bad_kind_setting_names_its_key(section, message, project):
    from adps.config import ParamsError

    write_params(project, **section)
    with pytest.raises(ParamsError, match=message):
        load_params(project / "params.yaml")


def test_tuning_a_memory_bank_says_there_is_nothing_to_tune(project):
    from adps import tuning

    with pytest.raises(AdpsError, match="model.kind is memory_bank: nothing is trained.*set model.kind to auto"):
        tuning.tune(tiny_params(model={"kind": "memory_bank"}).at(project), "washer")
    assert not (project / "optuna.db").exists()  # refused before a study was made


def test_the_bank_ablation_builds_each_variant_as_distill_does(project):
    from adps.config import override_params
    from benchmarks.bank_ablation import VARIANTS, bank_metrics

    params = tiny_params().at(project)
    entries = []
    for bank in VARIANTS.values():
        overrides = {"model.kind": "memory_bank", **{f"model.memory_bank.{k}": v for k, v in bank.items()}}
        metrics = bank_metrics(override_params(params, overrides), "washer")
        assert 0 <= metrics["image_auroc"] <= 1
        entries.append(metrics["entries"])
    # 10 normals, 2 held out: 8 images x 8 x 8 positions (stride 8 at 64 px) = 512; a 10 % coreset keeps 51
    assert entries == [512, 512, 51]
