"""One Optuna study shared through a real PostgreSQL server by two `adps tune` processes started at once.

The server comes from pip (pgserver) in a temp folder; ``ADPS_TEST_POSTGRES_URL`` (a ``postgresql://``
URL) uses an existing server instead. Both processes race to create the study: there must be one
study, one baseline trial, one parent MLflow run, and the trial counts must add up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import optuna
import pytest
from mlflow import MlflowClient

from adps.config import load_params
from adps.tuning import PARENT_RUN_ATTR, storage_url
from tests.conftest import project_env, write_params

TRIALS_EACH = 2
ADPS = [sys.executable, "-m", "adps.cli"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    if url := os.environ.get("ADPS_TEST_POSTGRES_URL"):
        yield url
        return
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def test_two_processes_share_one_study_on_postgresql(project, tmp_path, postgres_url):
    name = f"pg-{uuid.uuid4().hex[:8]}"  # a fresh study even on a shared server
    write_params(
        project,
        data={"categories": ["washer"], "image_size": 64},
        tracking={"uri": f"sqlite:///{tmp_path / 'runs.db'}"},
        tune={
            "storage": postgres_url,
            "study_name": name,
            "objective": "pixel_ap",
            "pruner": "none",
            "budget": {"distill_epochs": 1, "psm_epochs": 1},
        },
    )
    command = [*ADPS, "--debug", "tune", "-c", "washer", "--trials", str(TRIALS_EACH), "--workers", "1"]
    hosts = [
        subprocess.Popen(command, cwd=project, env=project_env(project), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [host.communicate(timeout=900) for host in hosts]
    for host, (_, err) in zip(hosts, outputs, strict=True):
        assert host.returncode == 0, err.decode()

    params = load_params(project / "params.yaml")
    assert storage_url(params).startswith("postgresql+psycopg://")
    study = optuna.load_study(study_name=f"{name}-washer", storage=storage_url(params))
    assert len(study.trials) == 2 * TRIALS_EACH
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}", registry_uri=f"sqlite:///{tmp_path / 'runs.db'}")
    runs = client.search_runs([client.get_experiment_by_name("adps").experiment_id])
    parents = [r for r in runs if r.data.tags.get("optuna_study") == f"{name}-washer"]
    assert len(parents) == 1 and study.user_attrs[PARENT_RUN_ATTR] == parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 * TRIALS_EACH
