"""The registered champion behind `mlflow models serve`, called over REST as a line camera would."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import project_env, run, write_params
from tests.e2e.test_nightly_deployment import free_port

pytestmark = pytest.mark.slow


def strict_json(name: str) -> None:
    """A strict client's reader (JavaScript's JSON.parse): bare NaN or Infinity is not JSON."""
    raise ValueError(f"the answer holds {name}, which is not JSON")


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response, parse_constant=strict_json)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err, parse_constant=strict_json)


def test_served_champion_answers_images_like_adps_predict(trained_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(trained_project[0], root)
    write_params(root, data={"categories": ["washer"], "image_size": 64})
    env = project_env(root)
    run(["adps", "register", "-c", "washer"], root, env)
    images = sorted((root / "data/synthetic/washer/test").glob("*/000.png"))
    port = free_port()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/adps-washer@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(1)
        rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images] + [["bm90IGFuIGltYWdl"]]
        status, body = post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}}
        )
        assert status == 200
        served = body["predictions"]
        assert len(served) == len(images) + 1 and "cannot read image" in served[-1]["error"]
        assert served[-1]["score"] is None and served[-1]["threshold"] is None  # null, never NaN

        run(["adps", "predict", "--model", "models/washer", "--input", str(root / "data/synthetic/washer/test"),
             "--output", str(tmp_path / "out")], root, env)  # fmt: skip
        with open(tmp_path / "out/predictions.csv") as handle:
            local = {Path(r["path"]): r for r in csv.DictReader(handle)}
        for path, row in zip(images, served, strict=False):
            assert row["error"] == "" and row["score"] == pytest.approx(float(local[path]["score"]), rel=1e-5)
            assert str(row["is_anomalous"]) == local[path]["is_anomalous"]
            assert isinstance(json.loads(row["regions"]), list)
        encoded = [row[0] for row in rows[:2]]
        for shape in (
            {"instances": encoded},
            {"inputs": encoded},
            {"dataframe_records": [{"image": e} for e in encoded]},
            {"instances": [{"image": e} for e in encoded]},
        ):
            status, body = post(f"http://127.0.0.1:{port}/invocations", shape)
            assert status == 200 and [r["score"] for r in body["predictions"]] == [r["score"] for r in served[:2]]
        for shape in ({"dataframe_split": {"columns": ["img"], "data": [[encoded[0]]]}}, {"instances": [1, 2]}):
            status, body = post(f"http://127.0.0.1:{port}/invocations", shape)
            assert status == 400 and "expected one image per row: column 'image'" in body["message"], body

        upright = Image.open(images[0])
        exif = Image.Exif()
        exif[0x0112] = 6  # stored turned a quarter left, shown upright by every viewer
        buffer = io.BytesIO()
        upright.transpose(Image.Transpose.ROTATE_90).save(buffer, "PNG", exif=exif)
        sideways = [[base64.b64encode(buffer.getvalue()).decode()], *rows[1:]]  # the first request, image 0 turned
        _, body = post(
            f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": ["image"], "data": sideways}}
        )
        assert body["predictions"][0]["score"] == served[0]["score"]  # bit for bit: the same batch, read upright

        _, refused = post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["path"], "data": [["/etc/shadow"]]}},
        )
        assert refused["predictions"][0]["error"].startswith("paths are not accepted")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
