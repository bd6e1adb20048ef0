"""The registry over HTTP: a real `mlflow server` with proxied artifacts, restarted, used from another folder.

register (version 1), a changed model registered (version 2, challenger), `adps promote` makes it
champion; the server is killed and started again on the same store; then `adps predict --model
models:/adps-washer@champion` runs in an unrelated folder and gets version 2, with its artifacts
downloaded through the server (the client never sees the server's artifact folder).
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from mlflow import MlflowClient

from adps.inference import Predictor
from tests.conftest import project_env, run, write_params
from tests.servers import free_port, mlflow_server, stop

pytestmark = pytest.mark.slow


def test_register_promote_restart_and_load_the_champion_elsewhere(trained_project, tmp_path):
    root, store, elsewhere = tmp_path / "project", tmp_path / "server", tmp_path / "elsewhere"
    shutil.copytree(trained_project[0], root)
    write_params(root, data={"categories": ["washer"], "image_size": 64})
    store.mkdir()
    elsewhere.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**project_env(root), "MLFLOW_TRACKING_URI": uri}
    server = mlflow_server(store, port, tmp_path / "server1.log")
    try:
        run(["adps", "register", "-c", "washer"], root, env)
        thresholds = root / "models/washer/thresholds.json"
        changed = json.loads(thresholds.read_text()) | {"image": 0.123456}  # another model: a new version
        thresholds.write_text(json.dumps(changed))
        run(["adps", "register", "-c", "washer"], root, env)
        run(["adps", "promote", "-c", "washer", "--version", "2"], root, env)
    finally:
        stop(server)

    server = mlflow_server(store, port, tmp_path / "server2.log")
    try:
        client = MlflowClient(uri, registry_uri=uri)  # not a registry set by earlier tests in this process
        assert client.get_model_version_by_alias("adps-washer", "champion").version == "2"
        assert client.get_model_version_by_alias("adps-washer", "challenger").version == "2"
        images = root / "data/synthetic/washer/test"
        out = run(
            ["adps", "predict", "--model", "models:/adps-washer@champion", "-i", str(images), "-o", "predictions"],
            elsewhere,
            {**project_env(elsewhere), "MLFLOW_TRACKING_URI": uri},
        )
    finally:
        stop(server)
    assert json.JSONDecoder().raw_decode(out[out.index("{") :])[0]["n_unreadable"] == 0
    with (elsewhere / "predictions/predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    local = Predictor.from_dir(root / "models/washer", "cpu")
    expected = {r.path: r.score for r in local.predict_paths(sorted(images.rglob("*.png")))}
    assert len(rows) == len(expected) > 0
    for row in rows:
        assert float(row["threshold"]) == pytest.approx(0.123456)  # the champion is version 2
    assert sorted(float(r["score"]) for r in rows) == pytest.approx(sorted(expected.values()), abs=1e-5)
    assert (store / "artifacts").is_dir() and any((store / "artifacts").rglob("psm.pt"))
    assert not (root / "mlruns").exists() and not (root / "mlartifacts").exists()  # artifacts went to the server
