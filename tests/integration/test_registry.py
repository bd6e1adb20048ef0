"""MLflow tracking and registry for real (sqlite store in a temp dir), on one trained tiny category."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from adps import paths, stages, tracking
from adps.errors import AdpsError
from adps.inference import Predictor
from tests.conftest import project_env, run, tiny_params
from tests.servers import free_port


def evaluation_files() -> tuple:
    """washer's thresholds and metrics in the trained project (the cwd)."""
    return paths.thresholds_file(tiny_params(), "washer"), paths.metrics_file(tiny_params(), "washer")


@pytest.fixture
def store(trained_project, tmp_path, monkeypatch):
    """A fresh MLflow sqlite store per test, the trained project as cwd."""
    monkeypatch.chdir(trained_project[0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri, registry_uri=uri)  # not the process-wide registry URI an earlier test set


def test_register_logs_run_and_registers_challenger_and_first_champion(store, tmp_path):
    record = stages.register(tiny_params(), "washer")
    assert record["model"] == "adps-washer" and record["version"] == "1"
    assert set(record["aliases"]) == {"challenger", "champion"}
    run = store.get_run(record["run_id"])
    assert run.data.params["model.patches"] == "4" and "pixel_ap" in run.data.metrics
    assert (
        run.data.metrics["kind.adps_and_memory_bank.image_auroc"]
        == json.loads(evaluation_files()[1].read_text())["kinds"]["adps+memory_bank"]["image_auroc"]
    )  # every kind the model holds, on the same test split
    assert run.data.tags["teacher_weights"].startswith("none") and run.data.tags["git_commit"]
    history = store.get_metric_history(record["run_id"], "distill_loss_distill")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in store.list_artifacts(record["run_id"])}
    assert {"heatmaps", "plots", "washer.json", "distill.json", "psm.json", "params.yaml"} <= artifacts
    logged = yaml.safe_load(Path(store.download_artifacts(record["run_id"], "params.yaml", str(tmp_path))).read_text())
    assert logged == tiny_params().model_dump(mode="json")  # the params that ran, not a file that happens to lie there
    assert json.loads(paths.registry_record(tiny_params(), "washer").read_text())["version"] == "1"


def test_registering_the_same_model_again_creates_no_version(store):
    first = stages.register(tiny_params(), "washer")
    again = stages.register(tiny_params(), "washer")
    assert again["version"] == first["version"] and again["created"] is False
    assert len(store.search_model_versions("name='adps-washer'")) == 1


def test_pyfunc_loaded_by_alias_predicts_the_checkpoint_scores(store):
    stages.register(tiny_params(), "washer")
    predictor = tracking.load_registered_predictor("models:/adps-washer@champion")
    images = sorted(paths.category_dir(tiny_params(), "washer").glob("test/*/000.png"))
    registered = [r.score for r in predictor.predict_paths(images)]
    local = [r.score for r in Predictor.from_dir(paths.model_dir(tiny_params(), "washer")).predict_paths(images)]
    np.testing.assert_allclose(registered, local, rtol=1e-6)
    import mlflow.pyfunc
    import pandas as pd

    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
    model = mlflow.pyfunc.load_model("models:/adps-washer@challenger")
    frame = model.predict(pd.DataFrame({"image": [*encoded, "bm90IGFuIGltYWdl"]}), params={"return_map": True})
    np.testing.assert_allclose(frame["score"][:-1], local, rtol=1e-6)
    assert frame["error"][: len(images)].eq("").all() and "cannot read image row" in frame["error"].iloc[-1]
    pixel = json.loads(paths.thresholds_file(tiny_params(), "washer").read_text())["pixel"]
    for row, path in zip(frame.itertuples(), images, strict=False):
        regions = json.loads(row.regions)
        anomaly_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(row.map_png)))) / 65535
        assert (len(regions) > 0) == bool((anomaly_map >= pixel - 1e-4).any()), path
        for region in regions:
            assert 0 <= region["x"] < 64 and region["area"] <= region["width"] * region["height"]


def test_served_model_answers_every_accepted_shape_and_refuses_the_others(store):
    """One answer per image sent, whatever accepted shape carries them; any other shape is an error that says so."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    stages.register(tiny_params(), "washer")
    images = sorted(paths.category_dir(tiny_params(), "washer").glob("test/*/000.png"))[:2]
    local = [r.score for r in Predictor.from_dir(paths.model_dir(tiny_params(), "washer")).predict_paths(images)]
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
    model = mlflow.pyfunc.load_model("models:/adps-washer@champion")
    shapes = {
        "frame": pd.DataFrame({"image": encoded}),
        "frame with an extra column": pd.DataFrame({"image": encoded, "station": ["a", "b"]}),
        "bare list": encoded,
        "series": pd.Series(encoded),
        "mapping": {"image": encoded},
        "records": [{"image": e} for e in encoded],
        "records of 0-d arrays (REST inputs)": [{"image": np.array(e)} for e in encoded],
        "MIME base64 with line breaks": ["\n".join(e[i : i + 76] for i in range(0, len(e), 76)) for e in encoded],
    }
    for shape, request in shapes.items():
        answer = model.predict(request)
        assert len(answer) == 2 and answer["error"].eq("").all(), shape
        np.testing.assert_allclose(answer["score"], local, rtol=1e-6, err_msg=shape)
    with_gap = model.predict([encoded[0], None])  # a missing entry is that row's error, the others answered
    assert with_gap["error"][0] == "" and "give the image as base64" in with_gap["error"][1]
    for shape, request in {
        "a column named twice": pd.DataFrame([encoded], columns=["image", "image"]),
        "other column name": pd.DataFrame({"img": encoded}),
        "no rows": pd.DataFrame({"image": []}),
        "numbers": [1, 2],
    }.items():
        with pytest.raises(MlflowException, match=r"expected one image per row: column 'image'") as err:
            model.predict(request)
        assert err.value.get_http_status_code() == 400, shape


def test_served_model_opens_no_path_unless_allowed(store, monkeypatch, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    stages.register(tiny_params(), "washer")
    image = sorted(paths.category_dir(tiny_params(), "washer").glob("test/good/*.png"))[0].resolve()
    probes = ["/etc/shadow", "/etc/no-such-file", str(image)]
    refused = mlflow.pyfunc.load_model("models:/adps-washer@champion").predict(pd.DataFrame({"path": probes}))
    assert refused["error"].str.startswith("paths are not accepted").all()
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setenv("ADPS_SERVE_ALLOWED_ROOT", str(image.parent))
    allowed = mlflow.pyfunc.load_model("models:/adps-washer@champion").predict(
        pd.DataFrame(
            {"path": [*probes, str(image.parent / ".." / ".." / ".." / "params.yaml"), str(tmp_path / "fifo")]}
        )
    )
    assert allowed["error"][2] == "" and allowed["score"][2] > 0
    outside = allowed["error"].drop(index=2)
    assert outside.str.startswith("path not accepted").all() and outside.nunique() == 1  # no existence oracle


def change_model(metric_value: float) -> None:
    """A 'retrained' model: other thresholds (new hash) and a given pixel AP."""
    thresholds = json.loads(paths.thresholds_file(tiny_params(), "washer").read_text())
    thresholds["image"] += 0.001
    paths.thresholds_file(tiny_params(), "washer").write_text(json.dumps(thresholds))
    metrics = json.loads(paths.metrics_file(tiny_params(), "washer").read_text())
    metrics["pixel_ap"] = metric_value
    paths.metrics_file(tiny_params(), "washer").write_text(json.dumps(metrics))


def test_auto_promotion_and_manual_promote(store):
    saved = {
        p: p.read_bytes()
        for p in (paths.thresholds_file(tiny_params(), "washer"), paths.metrics_file(tiny_params(), "washer"))
    }
    try:
        params = tiny_params(registry={"auto_promote": True, "promote_metric": "pixel_ap", "min_delta": 0.01})
        change_model(0.10)
        assert stages.register(params, "washer")["version"] == "1"
        change_model(0.105)  # better, but not by min_delta: stays challenger
        second = stages.register(params, "washer")
        assert second["aliases"] == ["challenger"]
        change_model(0.5)
        third = stages.register(params, "washer")
        assert set(third["aliases"]) == {"challenger", "champion"}
        stages.promote(params, "washer", "1")
        assert str(store.get_model_version_by_alias("adps-washer", "champion").version) == "1"
        with pytest.raises(AdpsError, match="has no version 9"):
            stages.promote(params, "washer", "9")
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def test_unreachable_server_is_a_clear_error_and_keeps_local_outputs(trained_project, monkeypatch):
    monkeypatch.chdir(trained_project[0])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    before = {
        p: p.read_bytes()
        for p in (paths.psm_checkpoint(tiny_params(), "washer"), paths.metrics_file(tiny_params(), "washer"))
    }
    with pytest.raises(tracking.TrackingUnavailable, match=r"unreachable.*make up"):
        stages.register(tiny_params(), "washer")
    assert {p: p.read_bytes() for p in before} == before


def test_git_dirty_counts_source_and_params_not_pipeline_outputs(tmp_path, monkeypatch):
    env = project_env(tmp_path)
    (tmp_path / "adps").mkdir()
    (tmp_path / "adps" / "stage.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("runtime: {seed: 1}\n")
    run(["git", "init", "-q"], tmp_path, env)
    run(["git", "add", "-A"], tmp_path, env)
    run(["git", "commit", "-qm", "c"], tmp_path, env)
    monkeypatch.chdir(tmp_path)
    for output in ("data/synthetic/a.png", "data/.gitignore", "models/washer/psm.pt", "reports/metrics/w.json"):
        (tmp_path / output).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / output).write_text("written by the pipeline")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert tracking.git_tags(tmp_path)["git_dirty"] == "false"
    (tmp_path / "params.yaml").write_text("runtime: {seed: 2}\n")
    assert tracking.git_tags(tmp_path)["git_dirty"] == "true"
    run(["git", "checkout", "params.yaml"], tmp_path, env)
    (tmp_path / "adps" / "new_module.py").write_text("y = 2\n")  # untracked source counts too
    assert tracking.git_tags(tmp_path)["git_dirty"] == "true"


def test_version_page_compares_with_the_champion_and_a_manual_champion_stays(store):
    saved = {
        p: p.read_bytes()
        for p in (paths.thresholds_file(tiny_params(), "washer"), paths.metrics_file(tiny_params(), "washer"))
    }
    try:
        first = stages.register(tiny_params(), "washer")
        before = json.loads(paths.metrics_file(tiny_params(), "washer").read_text())["pixel_ap"]
        change_model(before + 0.25)  # clearly better, but auto_promote is off
        second = stages.register(tiny_params(), "washer")
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    assert str(store.get_model_version_by_alias("adps-washer", "champion").version) == first["version"]
    assert second["aliases"] == ["challenger"]
    page = store.get_model_version("adps-washer", second["version"]).description
    assert "vs champion (version 1)" in page and f"| pixel_ap | {before + 0.25:.4f} | {before:.4f} | +0.2500 |" in page
    assert "auto-promotion off" in page and "dvc repro register@washer" in page and "teacher weights: none" in page
    assert "no champion yet" in store.get_model_version("adps-washer", first["version"]).description
    assert "base64" in store.get_registered_model("adps-washer").description
    artifacts = {a.path for a in store.list_artifacts(second["run_id"], "plots")}
    assert {"plots/curves.png", "plots/heatmaps.png"} <= artifacts
    assert store.get_run(second["run_id"]).data.tags["mlflow.note.content"] == page
