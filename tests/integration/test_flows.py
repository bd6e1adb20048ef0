"""The Prefect flow for real (prefect_test_harness): registration, DVC bookkeeping, failure handling."""

from __future__ import annotations

import json
import os

import pytest
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness

from adps.errors import AdpsError
from flows.pipeline import adps_pipeline
from tests.conftest import make_dvc_project, output_digests, project_env, run, write_params


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, harness):
    """A tiny DVC project in which the flow ran once, successfully."""
    root = tmp_path_factory.mktemp("flowproj")
    env = project_env(root)
    make_dvc_project(root, env)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("PATH", env["PATH"])
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri in earlier tests sets it
        rows = adps_pipeline(params_path="params.yaml")
    return root, env, rows


def test_flow_registers_challenger_and_publishes_the_table(flow_project):
    root, _, rows = flow_project
    assert [r["status"] for r in rows] == ["retrained"] and rows[0]["category"] == "washer"
    assert rows[0]["ran"] == "validate, distill, psm, evaluate, export, register"
    registry = json.loads((root / "reports/registry/washer.json").read_text())
    assert registry["model"] == "adps-washer" and "challenger" in registry["aliases"]
    table = Artifact.get("adps-metrics")
    assert table is not None and "washer" in str(table.data)


def test_flow_and_dvc_repro_write_the_same_files(flow_project, repro_project):
    """One stage graph, two front-ends: equal params give byte-identical models and metrics, and equal DVC hashes."""
    root, env, _ = flow_project
    _, _, _, repro_digests = repro_project
    assert output_digests(root) == repro_digests
    assert "up to date" in run(["dvc", "status"], root, env)


def test_failed_validation_holds_the_category_back_and_keeps_champion(flow_project, monkeypatch):
    root, _, _ = flow_project
    monkeypatch.chdir(root)
    before = {p: os.stat(root / p).st_mtime_ns for p in ("models/washer/psm.pt", "models/washer/student.pt")}
    registry_before = (root / "reports/registry/washer.json").read_text()
    write_params(root, data={"categories": ["washer"], "image_size": 64}, validation={"min_train": 1000})
    with pytest.raises(AdpsError, match="washer held back by <category washer>"):
        adps_pipeline(params_path="params.yaml")
    assert {p: os.stat(root / p).st_mtime_ns for p in before} == before
    assert (root / "reports/registry/washer.json").read_text() == registry_before
    artifact = Artifact.get("validation-failures-washer")
    assert artifact is not None and "fewer than 1000 training images" in str(artifact.data)


def test_tune_flow_publishes_best_params(flow_project, monkeypatch, tmp_path):
    from flows.tune import adps_tune

    root, _, _ = flow_project
    monkeypatch.chdir(root)
    write_params(
        root,
        data={"categories": ["washer"], "image_size": 64},
        tracking={"uri": f"sqlite:///{tmp_path / 'runs.db'}"},
        tune={
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "pruner": "none",
            "budget": {"distill_epochs": 1, "psm_epochs": 1},
        },
    )
    result = adps_tune(category="washer", params_path="params.yaml", trials=1)
    assert result["n_trials"] == 1 and (root / "reports/tuning/washer/best_params.yaml").is_file()
    artifact = Artifact.get("tuning-washer")
    assert artifact is not None and "dvc exp run" in str(artifact.data)


def test_one_failing_category_fails_the_run_and_spares_the_others(harness, tmp_path, monkeypatch):
    root = tmp_path / "two"
    root.mkdir()
    env = project_env(root)
    make_dvc_project(root, env)
    write_params(root, data={"categories": ["washer", "fabric"], "image_size": 64})
    (root / "models/fabric/psm.pt").mkdir(parents=True)  # psm@fabric cannot write its checkpoint
    monkeypatch.chdir(root)
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(AdpsError, match=r"fabric failed at psm"):
        adps_pipeline(params_path="params.yaml")
    assert json.loads((root / "reports/registry/washer.json").read_text())["aliases"]
    assert not (root / "reports/registry/fabric.json").exists()
    status = run(["dvc", "status", "register@washer", "evaluate@washer"], root, env)
    assert "up to date" in status
    assert "psm@fabric" in run(["dvc", "status", "psm@fabric"], root, env)  # not committed: still to run
    assert "up to date" in run(["dvc", "status", "distill@fabric"], root, env)  # it ran: committed, as dvc repro would
