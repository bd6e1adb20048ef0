"""One item never costs its neighbours: a file's name, kind or size is that file's error row; a request's
answer is valid JSON with every row; one log row the store refuses is lost alone (issue 31, items 2-5).

Real files (a latin-1 name, a FIFO, a socket), the real `adps predict`, MLflow's real scoring server
(its FastAPI app, in process), and a real PostgreSQL (pgserver).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from adps import stages
from adps.config import ParamsError, load_params, params_from_dict
from adps.files import json_text
from adps.inference import ImageSource, PixelBudget, Predictor, RequestOverBudget, predict_to_folder
from adps.production.log import PredictionLog, open_store, read_rows
from adps.serving import row_source
from tests.conftest import project_env, write_params
from tests.integration.test_prediction_log import settings

LATIN1_NAME = b"d\xe9faut.png"  # "défaut.png" saved on a latin-1 machine: not UTF-8
LONG_NAME = b"\xe9" * 130 + b".png"  # 134 bytes; as text (\xe9 four characters each) 524: over a file name's 255


def refuse_constant(name: str) -> None:
    """``parse_constant`` of a strict reader: bare NaN and Infinity are not JSON (JavaScript's JSON.parse)."""
    raise ValueError(f"{name} is not JSON")


@pytest.fixture
def washer_model(trained_project) -> Path:
    return trained_project[0] / "models/washer"


@pytest.fixture
def good_png(trained_project) -> bytes:
    return (trained_project[0] / "data/synthetic/washer/test/good/000.png").read_bytes()


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


# --- item 2: one file never kills a run -----------------------------------------------------------


def test_a_latin1_name_a_fifo_and_a_socket_are_rows_of_their_own(washer_model, good_png, tmp_path):
    """`adps predict` on a folder of 5 entries: good.png, d\\xe9faut.png and a 134-byte latin-1 name (copies of
    one image), a FIFO and a socket. 5 rows: 3 scored with equal scores, 2 errors that name what the file is;
    the FIFO is never opened (opening it would wait forever); the CSV, the summary and the log hold all 5."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in (b"good.png", LATIN1_NAME, LONG_NAME):
        (inputs / os.fsdecode(name)).write_bytes(good_png)
    os.mkfifo(inputs / "fifo.png")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(inputs / "socket.png"))
        env = {**project_env(tmp_path), "ADPS_PREDICTION_LOG": f"sqlite:///{tmp_path / 'log.db'}"}
        env["ADPS_REVIEW_DIR"] = str(tmp_path / "review")
        command = [sys.executable, "-m", "adps.cli", "predict", "-m", str(washer_model), "-i", str(inputs)]
        out = subprocess.run([*command, "-o", str(tmp_path / "out")], cwd=tmp_path, env=env,
                             capture_output=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    summary = json.loads(out.stdout, parse_constant=refuse_constant)
    with open(tmp_path / "out/predictions.csv", encoding="utf-8") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    escaped_long = "\\xe9" * 130 + ".png"
    assert set(rows) == {"good.png", "d\\xe9faut.png", escaped_long, "fifo.png", "socket.png"}
    assert summary["n_images"] == 5 and summary["n_unreadable"] == 2
    assert rows["fifo.png"]["error"].endswith("it is a named pipe (FIFO)") and rows["fifo.png"]["score"] == ""
    assert rows["socket.png"]["error"].endswith("it is a socket")
    scores = {rows[n]["score"] for n in ("good.png", "d\\xe9faut.png", escaped_long)}
    assert len(scores) == 1 and "" not in scores  # the same image under three names: one score
    heatmap = Path(rows["d\\xe9faut.png"]["heatmap"])
    assert heatmap.name == "d\\xe9faut.png.png" and heatmap.is_file()  # named as the CSV says
    long_heatmap = Path(rows[escaped_long]["heatmap"])
    assert long_heatmap.is_file() and len(long_heatmap.name.encode()) <= 255
    logged = {Path(r["input_name"]).name: r for r in read_rows(f"sqlite:///{tmp_path / 'log.db'}")}
    assert set(logged) == set(rows) and summary["log"]["lost"] == 0 and summary["log"]["logged"] == 5
    assert logged["fifo.png"]["input_sha256"] is None and logged["d\\xe9faut.png"]["score"] is not None


def test_names_with_terminal_markup_or_latin1_bytes_are_shown_as_they_are(washer_model, tmp_path):
    """rich reads ``[/x]`` as a closing tag: the error report itself crashed on such a name (a traceback)."""
    from typer.testing import CliRunner

    from adps.cli import app

    missing = tmp_path / "[/x]" / os.fsdecode(LATIN1_NAME)
    out = CliRunner().invoke(app, ["predict", "-m", str(washer_model), "-i", str(missing), "-o", str(tmp_path / "o")])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit)  # a reported error, not a crash
    assert f"input not found: {tmp_path}/[/x]/d\\xe9faut.png" in " ".join(out.output.split())


def test_an_output_that_cannot_be_written_is_its_rows_error(washer_model, good_png, tmp_path):
    """`a.png` gets the heatmap file heatmaps/a.png.png; the image `a.png.png/b.png` needs a folder of that name
    for its own: it is scored, its row says its heatmap could not be written, and the run finishes."""
    inputs = tmp_path / "inputs"
    (inputs / "a.png.png").mkdir(parents=True)
    (inputs / "a.png").write_bytes(good_png)
    (inputs / "a.png.png/b.png").write_bytes(good_png)
    summary = predict_to_folder(Predictor.from_dir(washer_model, "cpu"), inputs, tmp_path / "out")
    with open(tmp_path / "out/predictions.csv", encoding="utf-8") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert rows["a.png"]["error"] == "" and Path(rows["a.png"]["heatmap"]).is_file()
    assert rows["b.png"]["score"] == rows["a.png"]["score"] and rows["b.png"]["heatmap"] == ""
    assert rows["b.png"]["error"].startswith("scored, but its heatmap or raw map could not be written")
    assert summary["outputs_not_written"] == [str(inputs / "a.png.png/b.png")]


# --- item 3: memory by pixels --------------------------------------------------------------------


def test_an_image_over_the_pixel_budget_is_refused_from_its_header(washer_model, good_png, tmp_path):
    """The issue's file: a 8000 x 7999 PNG (tens of KB) is 63.992 MP, over the default 16 MP per image; it is
    refused from its header (never decoded: no 25 GB) and the image beside it is scored."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("L", (8000, 7999)).save(inputs / "huge.png")
    (inputs / "small.png").write_bytes(good_png)
    assert (inputs / "huge.png").stat().st_size < 200_000
    predictor = Predictor.from_dir(washer_model, "cpu")
    predictor.budget = PixelBudget.from_params(None)  # the defaults: 16 MP per image, 64 per batch
    summary = predict_to_folder(predictor, inputs, tmp_path / "out")
    with open(tmp_path / "out/predictions.csv", encoding="utf-8") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert "8000x7999 px is 64 megapixels" in rows["huge.png"]["error"]
    assert "production.max_image_megapixels = 16" in rows["huge.png"]["error"]
    assert rows["small.png"]["score"] != "" and summary["n_unreadable"] == 1


def test_a_batch_over_the_request_budget_is_split_and_a_request_is_refused(washer_model, good_png):
    """The washer model resizes a 64 x 64 image (4096 px) and sees a 128 x 128 one at native size (16384 px).
    Budget 0.01 MP per image, 0.02 per request: the 128 x 128 image is its own error (16384 > 10000); five
    64 x 64 images hold 20480 px > 20000: `adps predict` scores them in batches of 4 + 1, a request is refused."""
    predictor = Predictor.from_dir(washer_model, "cpu")
    predictor.budget = PixelBudget(image_megapixels=0.01, request_megapixels=0.02)
    small = [ImageSource(f"{i}.png", data=good_png) for i in range(5)]
    big = ImageSource("big.png", data=png((128, 128)))
    assert [len(b) for b in predictor.batches([*small, big], batch_size=16)] == [4, 2]  # 4 x 4096; 4096 + 0
    with pytest.raises(
        RequestOverBudget, match=r"5 images hold 0.0205 megapixels, over production.max_request_megapixels = 0.02"
    ):
        predictor.predict_batch(small)
    results = predictor.predict_batch([*small[:4], big])
    assert [r.error for r in results[:4]] == [""] * 4
    assert "128x128 px is 0.0164 megapixels" in results[4].error and "max_image_megapixels = 0.01" in results[4].error


def test_a_budget_whose_image_limit_exceeds_its_request_limit_is_refused():
    with pytest.raises(ParamsError, match=r"production.max_image_megapixels \(80\) must not exceed"):
        params_from_dict({"production": {"max_image_megapixels": 80, "max_request_megapixels": 64}})


# --- items 3 and 4: the served model over REST ---------------------------------------------------


@pytest.fixture
def scoring_client(trained_project, tmp_path, monkeypatch):
    """The registered washer champion behind MLflow's own scoring server app, in a project whose budget is
    0.01 MP per image and 0.02 per request (a 64 x 64 image is 4096 px).

    Nothing is mocked: the app is the one `mlflow models serve` runs (``scoring_server.init`` on the model
    loaded from a real sqlite registry), driven over HTTP in process by FastAPI's test client, which spares
    the ~30 s of a server start; ``monkeypatch`` only sets the working folder and the store URLs. The e2e
    test (``tests/e2e/test_serving.py``) checks the same answers through a real `mlflow models serve`."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import load_model, scoring_server

    root = tmp_path / "project"
    for folder in ("data", "models", "reports"):
        shutil.copytree(trained_project[0] / folder, root / folder)
    write_params(root, production={"max_image_megapixels": 0.01, "max_request_megapixels": 0.02})
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ADPS_PREDICTION_LOG", f"sqlite:///{tmp_path / 'log.db'}")
    stages.register(load_params(root / "params.yaml"), "washer")
    model = load_model("models:/adps-washer@champion")
    with TestClient(scoring_server.init(model)) as client:
        yield client, model


def invoke(client, instances: list[str]):
    return client.post("/invocations", json={"instances": instances})


def test_error_rows_are_null_in_valid_json_and_an_oversized_request_is_413(scoring_client, good_png):
    client, _ = scoring_client
    encoded = base64.b64encode(good_png).decode()
    big = base64.b64encode(png((128, 128))).decode()
    answer = invoke(client, [encoded, "bm90IGFuIGltYWdl", big])  # good, not an image, over the image budget
    assert answer.status_code == 200
    rows = json.loads(answer.text, parse_constant=refuse_constant)["predictions"]
    assert rows[0]["error"] == "" and isinstance(rows[0]["score"], float) and isinstance(rows[0]["is_anomalous"], bool)
    for row in rows[1:]:
        assert row["score"] is None and row["threshold"] is None and row["is_anomalous"] is None and row["error"]
    assert "cannot read image row 1" in rows[1]["error"] and "max_image_megapixels = 0.01" in rows[2]["error"]

    too_large = invoke(client, [encoded] * 5)  # 5 x 4096 = 20480 px > 0.02 MP
    body = json.loads(too_large.text, parse_constant=refuse_constant)
    assert too_large.status_code == 413 and body["error_code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert "max_request_megapixels = 0.02" in body["message"] and "stack_trace" not in body
    assert "Traceback" not in too_large.text
    assert encoded not in too_large.text and len(too_large.text) < 1000  # the request is not quoted back
    assert invoke(client, [encoded] * 4).status_code == 200  # 16384 px fit


def test_a_server_side_failure_is_500_without_a_trace(scoring_client, good_png):
    """The served model's own state broken (a fault of ours, not the client's): 500, a short message, no trace;
    MLflow would answer an exception it does not know with 400 and the stack trace in the body."""
    client, model = scoring_client
    model.unwrap_python_model().served = None
    answer = invoke(client, [base64.b64encode(good_png).decode()])
    body = json.loads(answer.text, parse_constant=refuse_constant)
    assert answer.status_code == 500 and body["error_code"] == "INTERNAL_ERROR"
    assert "the served model failed on this request (AttributeError)" in body["message"]
    assert "stack_trace" not in body and "Traceback" not in answer.text


def test_every_json_the_project_writes_has_null_for_an_undefined_number():
    payload = {"image_auroc": float("nan"), "curve": [np.float32("inf"), 0.5], "n": np.int64(3)}
    assert json.loads(json_text(payload), parse_constant=refuse_constant) == {
        "curve": [None, 0.5],
        "image_auroc": None,
        "n": 3,
    }


# --- item 5: the log isolates rows ----------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    from tests.servers import postgres

    server = postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def fresh_database(url: str, name: str) -> str:
    """A database of its own on the server (each test counts its own rows)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return str(sa.engine.make_url(url).set(database=name))


def test_a_path_with_a_nul_byte_costs_no_log_row_on_postgresql(washer_model, good_png, tmp_path, postgres_url):
    """The issue's request: 10 good images and a path with a NUL byte. 10 + 1 = 11 rows recorded, 0 lost (before:
    PostgreSQL refused the NUL, and all 11 were lost). A category of 200 characters is stored cut to 128."""
    url = fresh_database(postgres_url, "nul_byte")
    predictor = Predictor.from_dir(washer_model, "cpu")
    sources = [row_source(i, {"image": base64.b64encode(good_png).decode()}, None) for i in range(10)]
    sources.append(row_source(10, {"path": "/srv/line-1/frame\x00.png"}, tmp_path))
    results = predictor.predict_batch(sources)
    log = PredictionLog(settings(tmp_path, url), "serve", "adps-washer")
    log.record(results, sources, predictor.thresholds | {"category": "c" * 200})
    assert log.flush(30)
    rows = read_rows(url)
    assert len(rows) == 11 and log.counts["logged"] == 11 and log.counts["lost"] == 0
    assert rows[-1]["input_name"] == "/srv/line-1/frame\\x00.png" and rows[-1]["error"].startswith("path not accepted")
    assert {len(r["category"]) for r in rows} == {128}


def test_a_row_the_store_refuses_is_lost_alone(washer_model, good_png, tmp_path, postgres_url, caplog):
    """A store that refuses one row (a CHECK constraint a DBA added): the batch of 4 fails, its rows are written
    one by one: 3 logged, 1 lost and named."""
    url = fresh_database(postgres_url, "refused_row")
    engine = open_store(url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE predictions ADD CONSTRAINT no_probe CHECK (input_name NOT LIKE 'probe%')"))
    engine.dispose()
    predictor = Predictor.from_dir(washer_model, "cpu")
    sources = [ImageSource(name, data=good_png) for name in ("a.png", "probe.png", "b.png", "c.png")]
    log = PredictionLog(settings(tmp_path, url), "serve", "adps-washer")
    log.record(predictor.predict_batch(sources), sources, predictor.thresholds)
    assert log.flush(30)
    assert [r["input_name"] for r in read_rows(url)] == ["a.png", "b.png", "c.png"]
    assert log.counts["logged"] == 3 and log.counts["lost"] == 1
    assert "the store refused the row of probe.png: IntegrityError" in caplog.text
