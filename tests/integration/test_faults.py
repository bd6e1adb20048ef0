"""Processes killed mid-work (kill -9), with the real tools: nothing is lost and a rerun finishes the job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import make_dvc_project, project_env, run, write_params
from tests.servers import free_port, mlflow_server, start

pytestmark = pytest.mark.slow


def kill_when(process: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def resume_epoch(path: Path) -> int:
    """The epoch a resume file holds (0 when absent), read without importing torch into the test's timing."""
    if not path.is_file():
        return 0
    import torch

    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # being written right now
        return 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


TRAIN = {"distill": {"epochs": 12, "batch_size": 4}, "psm": {"epochs": 12, "batch_size": 4}}


def test_dvc_repro_killed_in_distill_and_in_psm_resumes_to_the_uninterrupted_result(tmp_path):
    """Previous model and champion stay while a retraining is killed twice; the result equals a clean run."""
    projects = {}
    for name in ("killed", "clean"):  # only the killed one needs a previous model and champion
        root = tmp_path / name
        root.mkdir()
        env = project_env(root)
        make_dvc_project(root, env)
        if name == "killed":
            run(["dvc", "repro"], root, env)
        write_params(root, data={"categories": ["washer"], "image_size": 64}, train=TRAIN)
        projects[name] = (root, env)
    root, env = projects["killed"]
    old_model = {p: sha256(root / "models/washer" / p) for p in ("student.pt", "psm.pt")}
    registry = (root / "reports/registry/washer.json").read_text()

    models = root / "models/washer"
    first = start(["dvc", "repro"], root, env, tmp_path / "first.log")
    kill_when(first, lambda: resume_epoch(models / ".student.resume.pt") >= 3, "distill epoch 3")
    assert {p: sha256(models / p) for p in old_model} == old_model  # nothing deleted or half-written
    second = start(["dvc", "repro"], root, env, tmp_path / "second.log")
    kill_when(second, lambda: resume_epoch(models / ".psm.resume.pt") >= 3, "psm epoch 3")
    assert "distill: resuming from epoch" in (tmp_path / "second.log").read_text()
    assert sha256(models / "psm.pt") == old_model["psm.pt"]
    assert (root / "reports/registry/washer.json").read_text() == registry  # champion untouched
    out = run(["dvc", "repro"], root, env)
    assert "psm: resuming from epoch" in out

    clean_root, clean_env = projects["clean"]
    run(["dvc", "repro"], clean_root, clean_env)
    for name in ("student.pt", "psm.pt", "thresholds.json"):
        assert sha256(models / name) == sha256(clean_root / "models/washer" / name), name
    assert "up to date" in run(["dvc", "status"], root, env)


def test_killed_tune_is_continued_and_its_dead_trial_marked_failed(tmp_path):
    root = tmp_path / "tune"
    root.mkdir()
    env = project_env(root)
    make_dvc_project(root, env)
    run(["adps", "prepare"], root, env)
    tune = {
        "storage": f"sqlite:///{root / 'optuna.db'}",
        "pruner": "none",
        "heartbeat_seconds": 1,
        "budget": {"distill_epochs": 30, "psm_epochs": 1},
        "space": {"loss.push_weight": {"type": "float", "low": 0.5, "high": 2.0}},
    }
    write_params(root, data={"categories": ["washer"], "image_size": 64}, tune=tune)

    def running() -> bool:
        """A trial is RUNNING in Optuna and its nested MLflow run exists (the kill lands inside the trial)."""
        if not (root / "optuna.db").is_file() or not trial_run_logged():
            return False
        try:
            study = optuna.load_study(study_name="adps-washer", storage=f"sqlite:///{root / 'optuna.db'}")
        except KeyError:
            return False
        return any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)

    def trial_run_logged() -> bool:
        import sqlite3

        if not (root / "mlflow.db").is_file():
            return False
        try:
            with sqlite3.connect(root / "mlflow.db") as db:
                return db.execute("select count(*) from tags where key = 'optuna_trial'").fetchone()[0] > 0
        except sqlite3.OperationalError:  # tables not created yet
            return False

    killed = start(["adps", "tune", "-c", "washer", "--trials", "2"], root, env, tmp_path / "tune.log")
    kill_when(killed, running, "a running trial")
    time.sleep(3)  # longer than the grace period (2 x heartbeat)
    write_params(
        root,
        data={"categories": ["washer"], "image_size": 64},
        tune={**tune, "budget": {"distill_epochs": 1, "psm_epochs": 1}},
    )
    out = subprocess.run(
        ["adps", "tune", "-c", "washer", "--trials", "1"], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout[: out.stdout.index("\nApply with")])
    study = optuna.load_study(study_name="adps-washer", storage=f"sqlite:///{root / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"] and result["n_trials"] == 2
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("adps").experiment_id])
    trial_runs = {r.data.tags["optuna_trial"]: r for r in runs if "optuna_trial" in r.data.tags}
    assert trial_runs["0"].info.status == "FAILED" and trial_runs["1"].info.status == "FINISHED"
    assert len([r for r in runs if "optuna_study" in r.data.tags]) == 1  # one parent run, continued
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob(f"adps-trial-{killed.pid}*")]
    assert leftovers == []
    assert yaml.safe_load((root / "reports/tuning/washer/best_params.yaml").read_text())


def test_mlflow_server_killed_during_register_then_rerun_registers_once(trained_project, tmp_path):
    import sqlite3

    root = tmp_path / "project"
    shutil.copytree(trained_project[0], root)
    write_params(root, data={"categories": ["washer"], "image_size": 64})
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    env = project_env(root)
    env.update(
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )
    server = mlflow_server(store, port, tmp_path / "server1.log")

    def run_started() -> bool:
        with sqlite3.connect(store / "mlflow.db") as db:
            return db.execute("select count(*) from runs").fetchone()[0] > 0

    register = start(["adps", "register", "-c", "washer"], root, env, tmp_path / "register.log")
    kill_when(server, run_started, "a registration run")
    assert register.wait(timeout=300) == 1
    message = (tmp_path / "register.log").read_text()
    assert "lost the MLflow tracking server" in message and "Traceback" not in message
    assert (root / "models/washer/psm.pt").is_file()

    server = mlflow_server(store, port, tmp_path / "server2.log")
    try:
        run(["adps", "register", "-c", "washer"], root, env)
        client = MlflowClient(f"http://127.0.0.1:{port}", registry_uri=f"http://127.0.0.1:{port}")
        assert len(client.search_model_versions("name='adps-washer'")) == 1
        assert set(client.get_model_version("adps-washer", "1").aliases) == {"challenger", "champion"}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
