"""Production with real servers: the served champion logs every prediction to PostgreSQL from several workers,
answers while the store is down, and a drifted stream raises the monitor's event, which starts the nightly
deployment early on a real Prefect server (an in-distribution stream does not)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from adps.paths import sqlalchemy_url
from tests.conftest import REPO_ROOT, project_env, run, write_params
from tests.e2e.test_serving import post
from tests.integration.test_drift import darker, normals
from tests.servers import free_port, postgres, prefect_server, stop, wait_until_up

pytestmark = pytest.mark.slow
N_REQUESTS, PER_REQUEST = 24, 2


def registered_project(trained_project, tmp_path: Path, **params) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "project"
    shutil.copytree(trained_project[0], root)
    write_params(root, data={"categories": ["washer"], "image_size": 64}, **params)
    env = project_env(root)
    run(["adps", "register", "-c", "washer"], root, env)
    return root, env


def serve(root: Path, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """The champion behind `mlflow models serve` with two uvicorn workers (two processes writing the log)."""
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    command = ["mlflow", "models", "serve", "-m", "models:/adps-washer@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port), "--workers", "2"]  # fmt: skip
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    wait_until_up(f"http://127.0.0.1:{port}/ping", server, log, timeout=240)
    return server


def served_rows(url: str) -> int:
    engine = sa.create_engine(sqlalchemy_url(url, Path.cwd()))
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("select count(*) from predictions where source = 'serve'")).scalar_one()
    finally:
        engine.dispose()


def test_many_workers_log_every_prediction_and_a_store_down_fails_none(trained_project, tmp_path):
    db = postgres(tmp_path / "pg")
    root, env = registered_project(trained_project, tmp_path)
    env.update(ADPS_PREDICTION_LOG=db.get_uri(), ADPS_REVIEW_DIR=str(tmp_path / "review"))
    port, log = free_port(), tmp_path / "serve.log"
    server = serve(root, env, port, log)
    try:
        images = sorted((root / "data/synthetic/washer/test").rglob("*.png"))[:PER_REQUEST]
        payload = {"instances": [base64.b64encode(p.read_bytes()).decode() for p in images]}
        url = f"http://127.0.0.1:{port}/invocations"
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(url, payload), range(N_REQUESTS)))
        assert all(status == 200 and len(body["predictions"]) == PER_REQUEST for status, body in answers)
        deadline = time.monotonic() + 60
        while served_rows(db.get_uri()) < N_REQUESTS * PER_REQUEST and time.monotonic() < deadline:
            time.sleep(0.5)
        assert served_rows(db.get_uri()) == N_REQUESTS * PER_REQUEST  # none lost, none twice

        db.cleanup()  # the store goes down; the server keeps answering
        status, body = post(url, payload)
        assert status == 200 and all(row["error"] == "" and row["score"] >= 0 for row in body["predictions"])
        deadline = time.monotonic() + 60
        while "rows not recorded" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "rows not recorded" in log.read_text() and "the predictions were answered" in log.read_text()
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        db.cleanup()


def api(base: str, path: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def early_nightly_runs(base: str) -> list[dict]:
    """Runs of the nightly deployment an automation created (the schedule creates its own upcoming runs)."""
    deployment = api(base, "/deployments/name/adps-pipeline/nightly")
    runs = api(base, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
    return [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]


def monitor(root: Path, env: dict[str, str], since: datetime) -> str:
    """The monitor flow over the predictions logged since ``since``, against the real Prefect server."""
    hours = (datetime.now(UTC) - since).total_seconds() / 3600 + 1e-3
    out = run([sys.executable, "-m", "flows.monitor", "--params", str(root / "params.yaml"), "--hours", str(hours)],
              REPO_ROOT, env)  # fmt: skip
    return out


def test_a_drifted_stream_starts_the_nightly_run_early_and_a_normal_one_does_not(trained_project, tmp_path):
    # The 2-epoch test model's scores are flat (it flags most normal images): the flag-rate check is left out
    # here by expecting nearly every image flagged (it is tested in tests/integration/test_drift.py).
    root, env = registered_project(
        trained_project, tmp_path, monitor={"min_predictions": 20, "expected_defect_rate": 0.97}
    )
    port = free_port()
    server = prefect_server(tmp_path, port, tmp_path / "prefect.log")
    base = f"http://127.0.0.1:{port}/api"
    env.update(PREFECT_API_URL=base, PREFECT_HOME=str(tmp_path / ".prefect"))
    try:
        apply = "from flows.serve import deployments; import sys; [d.apply() for d in deployments(sys.argv[1])]"
        run([sys.executable, "-c", apply, str(root / "params.yaml")], REPO_ROOT, env)
        assert api(base, "/automations/filter", {})[0]["name"] == "nightly-early-on-drift"
        fresh = normals(tmp_path / "stream", 300, 30)

        since = datetime.now(UTC)
        run(
            ["adps", "predict", "-m", "models/washer", "-i", str(fresh[0].parent), "-o", str(tmp_path / "o1")],
            root,
            env,
        )
        assert "washer: no drift" in monitor(root, env, since)
        time.sleep(10)  # time for an automation to react, had there been an event
        assert early_nightly_runs(base) == []

        since = datetime.now(UTC)
        dark = darker(fresh, tmp_path / "dark", 0.5)[0].parent
        run(["adps", "predict", "-m", "models/washer", "-i", str(dark), "-o", str(tmp_path / "o2")], root, env)
        assert "washer: drift: " in monitor(root, env, since)
        engine = sa.create_engine(f"sqlite:///{root / 'mlflow.db'}")
        with engine.connect() as conn:  # the monitor read the reference registered with the champion
            models = conn.execute(sa.text("select value from tags where key = 'model'")).scalars().all()
        engine.dispose()
        assert models == ["champion version 1", "champion version 1"]
        deadline = time.monotonic() + 90
        while not (runs := early_nightly_runs(base)) and time.monotonic() < deadline:
            time.sleep(1)
        assert len(runs) == 1, runs
    finally:
        stop(server)
