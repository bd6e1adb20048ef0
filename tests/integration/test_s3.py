"""A team shares data, weights and registered models through S3-compatible storage (moto's server, started here).

Clone A pushes its DVC outputs to an S3 remote and registers its model on an MLflow server whose
artifacts live in the bucket; clone B, another folder, pulls: its `dvc repro` runs nothing,
`adps predict` works on the pulled model, and the registry's champion (artifacts proxied from S3
by the server) predicts the same scores.
"""

from __future__ import annotations

import csv
import shutil

import pytest

from tests.conftest import project_env, run
from tests.servers import free_port, mlflow_server, start, stop, wait_until_up

pytestmark = pytest.mark.slow

BUCKET = "adps-team"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server with an empty bucket: its endpoint URL."""
    import boto3

    folder, port = tmp_path_factory.mktemp("s3"), free_port()
    server = start(["moto_server", "-H", "127.0.0.1", "-p", str(port)], folder, project_env(folder), folder / "s3.log")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{endpoint}/moto-api/", server, folder / "s3.log")
        boto3.client("s3", endpoint_url=endpoint, **aws_arguments()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop(server)


def aws_arguments() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def predictions(folder) -> list[tuple[str, float]]:
    with (folder / "predictions.csv").open() as handle:
        return sorted((row["path"].split("/test/")[-1], float(row["score"])) for row in csv.DictReader(handle))


def test_dvc_remote_and_mlflow_artifacts_on_s3_serve_a_second_clone(repro_project, s3, tmp_path):
    import boto3

    first, second = tmp_path / "clone-a", tmp_path / "clone-b"
    shutil.copytree(repro_project[0], first, symlinks=True)
    env_a = {**project_env(first), **AWS}
    run(["dvc", "repro"], first, env_a)  # up to date unless an earlier test changed the shared project
    run(["dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc"], first, env_a)
    run(["dvc", "remote", "modify", "team", "endpointurl", s3], first, env_a)
    run(["git", "add", "-A"], first, env_a)
    run(["git", "commit", "-qm", "outputs and the team's S3 remote"], first, env_a)
    run(["dvc", "push"], first, env_a)

    store, port = tmp_path / "mlflow", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(
        store,
        port,
        tmp_path / "mlflow.log",
        artifacts=f"s3://{BUCKET}/mlflow",
        env={**AWS, "MLFLOW_S3_ENDPOINT_URL": s3},
    )
    try:
        run(["adps", "register", "-c", "washer"], first, {**env_a, "MLFLOW_TRACKING_URI": uri})

        run(["git", "clone", "-q", str(first), str(second)], tmp_path, env_a)
        env_b = {**project_env(second), **AWS}
        run(["dvc", "pull"], second, env_b)
        assert "Data and pipelines are up to date" in run(["dvc", "status"], second, env_b)
        assert "Running stage" not in run(["dvc", "repro"], second, env_b)  # nothing reruns
        images = str(second / "data/synthetic/washer/test")
        run(["adps", "predict", "-m", "models/washer", "-i", images, "-o", "local"], second, env_b)
        no_s3 = {k: v for k, v in project_env(second).items() if not k.startswith("AWS_")}  # the server proxies S3
        champion = "models:/adps-washer@champion"
        run(
            ["adps", "predict", "-m", champion, "-i", images, "-o", "registry"],
            second,
            {**no_s3, "MLFLOW_TRACKING_URI": uri},
        )
    finally:
        stop(server)
    local, registry = predictions(second / "local"), predictions(second / "registry")
    assert [name for name, _ in local] == [name for name, _ in registry] and local
    assert [score for _, score in registry] == pytest.approx([score for _, score in local], abs=1e-5)
    listed = boto3.client("s3", endpoint_url=s3, **aws_arguments()).list_objects_v2(Bucket=BUCKET)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any(k.startswith("dvc/") for k in keys) and any(
        k.startswith("mlflow/") and k.endswith("psm.pt") for k in keys
    )
    assert not (second / "mlruns").exists()
