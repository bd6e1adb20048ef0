"""The nightly flow does only what changed: real Prefect, real DVC, real MLflow on a tiny two-category project.

One project, runs in order: a full run; a second run (nothing to do); new images for one category
(only it retrains); a corrupt image in one category while the other gets new images (held back vs
retrained); a forced run (everything runs, identical models, no new version).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
from prefect.testing.utilities import prefect_test_harness

from adps.data.embedded import write_new_images
from flows.pipeline import adps_pipeline
from tests.conftest import make_dvc_project, project_env, run, tiny_params

CATEGORIES = ["fabric", "washer"]
STAGES = ("validate", "distill", "psm", "evaluate", "export", "register")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    """A tiny DVC project (two categories) after one full flow run: (root, env, MLflow client)."""
    with prefect_test_harness(server_startup_timeout=120):
        root = tmp_path_factory.mktemp("nightly")
        env = project_env(root)
        make_dvc_project(root, env, data={"categories": CATEGORIES, "image_size": 64})
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.setenv("PATH", env["PATH"])
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri in earlier tests sets it
            first = run_flow()
            assert first.is_completed(), first.message
            client = MlflowClient(f"sqlite:///{root}/mlflow.db", registry_uri=f"sqlite:///{root}/mlflow.db")
            yield root, env, client


def run_flow(**kwargs):
    return adps_pipeline(params_path="params.yaml", return_state=True, **kwargs)


def stage_states(flow_state) -> dict[str, str]:
    """State name of every stage task of a flow run and its subflow, by task run name (``distill@fabric``)."""
    parent = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
        )
        ids = [parent, *(child.id for child in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {r.name: r.state.name for r in runs}


def table_rows() -> dict[str, dict]:
    data = Artifact.get("adps-metrics").data
    return {row["category"]: row for row in (json.loads(data) if isinstance(data, str) else data)}


def versions(client: MlflowClient, category: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='adps-{category}'"))


def add_images(root: Path, category: str, good: int, defects: int, tag: str) -> None:
    """New images for ``category`` in the source folder (data/incoming, the folder layout)."""
    incoming = root / "data" / "incoming" / category
    write_new_images(category, tiny_params().synthetic, incoming, good, defects, zlib.crc32(tag.encode()), f"{tag}_")


def model_mtimes(root: Path, category: str) -> dict[str, int]:
    return {name: os.stat(root / "models" / category / name).st_mtime_ns for name in ("student.pt", "psm.pt")}


def test_second_run_trains_nothing_and_registers_nothing(nightly, monkeypatch):
    root, env, client = nightly
    monkeypatch.chdir(root)
    before = {c: versions(client, c) for c in CATEGORIES}
    mtimes = {c: model_mtimes(root, c) for c in CATEGORIES}
    state = run_flow()
    assert state.is_completed(), state.message
    states = stage_states(state)
    stage_runs = [f"{s}@{c}" for c in CATEGORIES for s in STAGES] + ["prepare"]
    assert {name: states[name] for name in stage_runs} == dict.fromkeys(stage_runs, "Unchanged")
    rows = table_rows()
    assert [rows[c]["status"] for c in CATEGORIES] == ["unchanged", "unchanged"]
    assert all(rows[c]["ran"] == "nothing" and rows[c]["version"] == "1" for c in CATEGORIES)
    assert {c: versions(client, c) for c in CATEGORIES} == before
    assert {c: model_mtimes(root, c) for c in CATEGORIES} == mtimes
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env)


def test_new_images_retrain_only_their_category(nightly, monkeypatch):
    root, env, client = nightly
    monkeypatch.chdir(root)
    washer_models = model_mtimes(root, "washer")
    add_images(root, "fabric", good=5, defects=2, tag="day2")
    state = run_flow()
    assert state.is_completed(), state.message
    states = stage_states(state)
    assert [states[f"{s}@fabric"] for s in STAGES] == ["Completed"] * len(STAGES)
    assert [states[f"{s}@washer"] for s in STAGES] == ["Unchanged"] * len(STAGES)
    assert states["prepare"] == "Completed"
    rows = table_rows()
    assert rows["fabric"]["status"] == "retrained" and rows["washer"]["status"] == "unchanged"
    assert versions(client, "fabric") == ["1", "2"] and versions(client, "washer") == ["1"]
    assert model_mtimes(root, "washer") == washer_models
    new = client.get_model_version("adps-fabric", "2")
    assert "challenger" in new.aliases
    assert "What changed since version 1" in new.description and "+2 test/anomalous" in new.description
    assert "params: unchanged" in new.description
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env)
    repro = run(["dvc", "repro"], root, env)
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro


def test_corrupt_new_image_holds_back_its_category_only(nightly, monkeypatch):
    root, env, client = nightly
    monkeypatch.chdir(root)
    washer_models, washer_versions = model_mtimes(root, "washer"), versions(client, "washer")
    fabric_versions = versions(client, "fabric")
    add_images(root, "fabric", good=3, defects=0, tag="day3")
    bad = root / "data" / "incoming" / "washer" / "normal" / "day3_truncated.png"
    add_images(root, "washer", good=1, defects=0, tag="day3")
    bad.write_bytes((bad.parent / "day3_000.png").read_bytes()[:200])  # a truncated upload
    state = run_flow()
    assert state.is_failed() and "washer held back" in state.message and "day3_truncated.png" in state.message
    rows = table_rows()
    assert rows["washer"]["status"] == "held back" and "day3_truncated.png" in rows["washer"]["held back by"]
    assert rows["fabric"]["status"] == "retrained"
    assert versions(client, "fabric") == [*fabric_versions, str(len(fabric_versions) + 1)]
    assert versions(client, "washer") == washer_versions and model_mtimes(root, "washer") == washer_models
    failures = Artifact.get("validation-failures-washer")
    assert failures is not None and "day3_truncated.png" in str(failures.data)
    status = run(["dvc", "status"], root, env)  # washer waits for good data; fabric is committed
    assert "validate@washer" in status and "fabric" not in status
    bad.unlink()


def test_forced_run_runs_every_stage_and_reproduces_the_models(nightly, monkeypatch):
    root, env, client = nightly
    monkeypatch.chdir(root)
    state = run_flow()  # washer catches up with its good new image (the corrupt one was removed)
    assert state.is_completed(), state.message
    assert table_rows()["washer"]["status"] == "retrained"
    before = {c: versions(client, c) for c in CATEGORIES}
    forced = run_flow(force=True)
    assert forced.is_completed(), forced.message
    states = stage_states(forced)
    assert {states[f"{s}@{c}"] for c in CATEGORIES for s in STAGES} == {"Completed"}
    assert {c: versions(client, c) for c in CATEGORIES} == before  # same weights: no new version
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env)
