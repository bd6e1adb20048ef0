"""End to end, as a user: `make up`'s services script, then `prefect deployment run 'adps-pipeline/nightly'`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_dvc_project, project_env, run
from tests.servers import free_port

pytestmark = pytest.mark.slow


def test_make_up_then_nightly_deployment_run_completes_and_registers(tmp_path: Path):
    root = tmp_path / "project"
    root.mkdir()
    env = project_env(root)
    prefect_port, mlflow_port = free_port(), free_port()
    env.update(
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_PORT=str(prefect_port),
        MLFLOW_PORT=str(mlflow_port),
        BIN=str(Path(env["PATH"].split(":")[0])),
    )
    make_dvc_project(root, env)
    try:
        run(["bash", "scripts/services.sh", "up"], root, env)
        listed = run(["prefect", "deployment", "ls"], root, env)
        assert "adps-pipeline/nightly" in listed and "adps-tune/manual" in listed
        out = subprocess.run(
            ["prefect", "deployment", "run", "adps-pipeline/nightly", "--watch"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Completed" in out.stdout + out.stderr
        url = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/registered-models/get?name=adps-washer"
        with urllib.request.urlopen(url, timeout=30) as response:
            model = json.load(response)["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
        assert aliases.get("challenger") == "1" and aliases.get("champion") == "1"
        assert "up to date" in run(["dvc", "status"], root, env)
        assert f"127.0.0.1:{prefect_port}" in (root / "prefect.toml").read_text()  # the project's own setting
        run_on_a_work_pool(root, tmp_path, env, f"http://127.0.0.1:{prefect_port}/api")
    finally:
        subprocess.run(["bash", "scripts/services.sh", "down"], cwd=root, env=env, capture_output=True, timeout=120)
        for log in sorted((root / ".run").glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
    assert not (root / "prefect.toml").exists()
    profiles = root / ".prefect" / "profiles.toml"
    assert not profiles.exists() or "PREFECT_API_URL" not in profiles.read_text()  # user profiles untouched


def run_on_a_work_pool(root: Path, tmp_path: Path, env: dict[str, str], api: str) -> None:
    """The team setup of prefect.yaml: the serving process stops, a worker on a process pool runs the deployment."""
    serve_pid = int((root / ".run" / "serve.pid").read_text())
    subprocess.run(["pkill", "-TERM", "-P", str(serve_pid)], check=False)
    os.kill(serve_pid, signal.SIGTERM)
    run(["prefect", "work-pool", "create", "adps", "--type", "process"], root, env)
    run(["prefect", "--no-prompt", "deploy", "--all"], root, env)
    worker_dir = tmp_path / "worker"  # anywhere: the flow runs in the folder prefect deploy recorded
    worker_dir.mkdir()
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "adps"],
        cwd=worker_dir,
        env={**env, "PREFECT_API_URL": api},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert "'work_pool_name': 'adps'" in run(
            ["prefect", "deployment", "inspect", "adps-pipeline/nightly"], root, env
        )
        out = run(["prefect", "deployment", "run", "adps-pipeline/nightly", "--watch"], root, env)
        assert "Completed" in out
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert "Completed" in (tmp_path / "worker.log").read_text()  # the worker ran it (nothing changed: all Unchanged)
