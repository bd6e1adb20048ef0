"""MLflow tracking and registry for real (sqlite store in a temp dir), on one trained tiny category."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from adps import paths, stages, tracking
from adps.config import METRIC_NAMES
from adps.data.embedded import generate_category
from adps.data.splits import category_splits
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
    np.testing.assert_allclose(frame["score"][:-1].astype(float), local, rtol=1e-6)
    assert frame["error"][: len(images)].eq("").all() and "cannot read image row" in frame["error"].iloc[-1]
    assert frame["score"].iloc[-1] is None and frame["is_anomalous"].iloc[-1] is None  # null in JSON, never NaN
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


@pytest.fixture
def own_store(trained_project, tmp_path, monkeypatch):
    """A copy of the trained project as cwd (its data and model may change) and a fresh MLflow store."""
    root = tmp_path / "project"
    for folder in ("data", "models", "reports"):
        shutil.copytree(trained_project[0] / folder, root / folder)
    monkeypatch.chdir(root)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri, registry_uri=uri)


def independent_metrics(model_dir: Path, samples: list) -> dict[str, float]:
    """Image AUROC and AP and pixel AP of a model folder on ``samples``: scikit-learn on `adps predict`'s results."""
    results = Predictor.from_dir(model_dir).predict_paths([s.image_path for s in samples])
    labels, scores = [s.label for s in samples], [r.score for r in results]
    masks = [
        np.asarray(Image.open(s.mask_path)) > 0 if s.mask_path else np.zeros(r.anomaly_map.shape, bool)
        for s, r in zip(samples, results, strict=True)
    ]
    pixel_labels, pixel_scores = (
        np.concatenate([a.ravel() for a in arrays]) for arrays in (masks, [r.anomaly_map for r in results])
    )
    return {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "pixel_ap": average_precision_score(pixel_labels, pixel_scores),
    }


def comparison_table(page: str) -> dict[str, list[float | None]]:
    """The version page's table: metric -> [this version, champion] (None for '-')."""
    rows = [line.strip("|").split("|") for line in page.splitlines() if line.startswith("| ")]
    numbers = {cells[0].strip(): [c.strip() for c in cells[1:3]] for cells in rows if cells[0].strip() in METRIC_NAMES}
    return {k: [None if c == "-" else float(c) for c in cells] for k, cells in numbers.items()}


def ship(kind: str, claimed_pixel_ap: float, bump: float = 0.0) -> None:
    """A 'retrained' washer model: the same weights answering as ``kind`` (another thresholds.json, so a new
    version), and an evaluate report claiming ``claimed_pixel_ap`` (what the version's tags record)."""
    thresholds = json.loads(paths.thresholds_file(tiny_params(), "washer").read_text())
    thresholds["score"]["kind"] = kind
    thresholds["image"] += bump
    paths.thresholds_file(tiny_params(), "washer").write_text(json.dumps(thresholds))
    metrics = json.loads(paths.metrics_file(tiny_params(), "washer").read_text())
    metrics["pixel_ap"] = claimed_pixel_ap
    paths.metrics_file(tiny_params(), "washer").write_text(json.dumps(metrics))


def test_auto_promotion_decides_on_equal_terms_not_on_the_tags_and_manual_promote(own_store):
    """The tags (each version's own evaluate report) say the opposite of the shared scoring run: the run decides."""
    model_dir, test = paths.model_dir(tiny_params(), "washer"), category_splits(tiny_params(), "washer")[2]
    measured = {}
    for kind in ("adps", "memory_bank"):
        ship(kind, 0.5)
        measured[kind] = independent_metrics(model_dir, test)["pixel_ap"]
    worse, better = sorted(measured, key=measured.get)
    gap = measured[better] - measured[worse]
    assert gap > 1e-4, measured
    params = tiny_params(registry={"auto_promote": True, "promote_metric": "pixel_ap", "min_delta": gap / 2})
    ship(worse, claimed_pixel_ap=0.99)
    assert stages.register(params, "washer")["version"] == "1"
    ship(better, claimed_pixel_ap=0.0)  # tags: 0.0 against 0.99; on equal terms it is better by `gap`
    second = stages.register(params, "washer")
    assert set(second["aliases"]) == {"challenger", "champion"}
    version = own_store.get_model_version("adps-washer", second["version"])
    assert version.tags["pixel_ap"] == "0.0" and version.tags["champion_compared"] == "1"  # tags: evaluate's report
    assert version.tags["equal_terms_split"].startswith("test split of this version: 7 images (2 normal, 5 defect)")
    shown = comparison_table(version.description)["pixel_ap"]
    np.testing.assert_allclose(shown, [measured[better], measured[worse]], atol=6e-5)
    ship(worse, claimed_pixel_ap=0.99, bump=0.001)  # tags: 0.99 against 0.0; on equal terms worse
    third = stages.register(params, "washer")
    assert third["aliases"] == ["challenger"]
    assert str(own_store.get_model_version_by_alias("adps-washer", "champion").version) == second["version"]
    stages.promote(params, "washer", "1")
    assert str(own_store.get_model_version_by_alias("adps-washer", "champion").version) == "1"
    with pytest.raises(AdpsError, match="has no version 9"):
        stages.promote(params, "washer", "9")


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


def change_test_split(params) -> dict[str, int]:
    """What a nightly import does to washer's test split: a normal image gone, new normal and defect images
    (with masks); returns how many test images of each label the folder then holds."""
    folder = paths.category_dir(params, "washer")
    (folder / "test" / "good" / "001.png").unlink()
    fresh = folder.parent.parent / "day2"
    generate_category("washer", params.synthetic, 99, fresh)  # other images, same layout
    for kind, index in [("good", 0), ("good", 1), ("scratch", 0), ("crack", 0), ("hole", 0)]:
        shutil.copy(fresh / "test" / kind / f"00{index}.png", folder / "test" / kind / f"10{index}.png")
        if kind != "good":
            shutil.copy(fresh / "ground_truth" / kind / "000_mask.png", folder / "ground_truth" / kind / "100_mask.png")
    shutil.rmtree(fresh)
    return {"normal": 3, "defect": 8}


def test_version_page_scores_the_champion_on_this_versions_test_split_and_a_manual_champion_stays(own_store, tmp_path):
    first = stages.register(tiny_params(), "washer")
    old_tags = own_store.get_model_version("adps-washer", first["version"]).tags
    assert old_tags["champion_compared"] == "none" and old_tags["equal_terms_split"] == "no: first version"
    assert "no champion yet" in own_store.get_model_version("adps-washer", first["version"]).description
    champion_dir = shutil.copytree(paths.model_dir(tiny_params(), "washer"), tmp_path / "version1")
    params = tiny_params(data={"val_defect_fraction": 0.5}, score={"method": "topk", "topk": 50})
    in_folder = change_test_split(params)
    stages.evaluate(params, "washer")  # the nightly run re-evaluates on the new split (and ships other scoring)
    second = stages.register(params, "washer")

    _, val, test = category_splits(params, "washer")
    held_out = [s for s in val if s.label == 1]
    assert len(held_out) == 3 and not set(held_out) & set(test)  # one of each defect kind with two images
    assert len(test) == in_folder["normal"] + in_folder["defect"] - len(held_out) == 8
    expected = independent_metrics(champion_dir, test)
    assert str(own_store.get_model_version_by_alias("adps-washer", "champion").version) == first["version"]
    assert second["aliases"] == ["challenger"]  # auto-promotion is off: the champion set before stays
    version = own_store.get_model_version("adps-washer", second["version"])
    page, table = version.description, comparison_table(version.description)
    assert "vs champion (version 1)" in page
    assert "Both scored on this version's test split: 8 images (3 normal, 5 defect), data sha256 " in page
    for metric, value in expected.items():
        assert table[metric][1] == pytest.approx(value, abs=6e-5), metric  # on the new split ...
    assert expected["image_auroc"] != pytest.approx(float(old_tags["image_auroc"]), abs=1e-3)  # not its old tags
    evaluated = json.loads(paths.metrics_file(params, "washer").read_text())
    for metric in METRIC_NAMES:  # this version's column: the same numbers as its `adps evaluate` report
        assert table[metric][0] == pytest.approx(evaluated[metric], abs=6e-5), metric
        assert version.tags[metric] == str(evaluated[metric])
    assert version.tags["champion_compared"] == "1" and version.tags["equal_terms_split"].endswith(
        version.tags["data_sha256"]
    )
    assert "auto-promotion off" in page and "dvc repro register@washer" in page and "teacher weights: none" in page
    assert "base64" in own_store.get_registered_model("adps-washer").description
    artifacts = {a.path for a in own_store.list_artifacts(second["run_id"], "plots")}
    assert {"plots/curves.png", "plots/heatmaps.png"} <= artifacts
    assert own_store.get_run(second["run_id"]).data.tags["mlflow.note.content"] == page


def test_an_unloadable_champion_falls_back_to_its_tags_and_says_why(own_store):
    first = stages.register(tiny_params(), "washer")
    [registered] = Path.cwd().glob("mlruns/models/*/artifacts/artifacts/model_dir/thresholds.json")
    registered.write_text("{not json")  # the champion's files in the artifact store are unusable
    before = json.loads(paths.metrics_file(tiny_params(), "washer").read_text())["pixel_ap"]
    change_model(before + 0.25)
    params = tiny_params(registry={"auto_promote": True, "promote_metric": "pixel_ap"})
    second = stages.register(params, "washer")  # registration goes on
    version = own_store.get_model_version("adps-washer", second["version"])
    page = version.description
    assert "Not on equal terms: the champion could not be scored on this version's test split" in page
    assert "models:/adps-washer/1 loaded but its model files are unusable" in page
    assert f"| pixel_ap | {before + 0.25:.4f} | {before:.4f} | +0.2500 |" in page  # evaluate's report vs its tags
    assert version.tags["equal_terms_split"] == "no: the champion could not be scored"
    assert version.tags["champion_compared"] == first["version"]
    assert set(second["aliases"]) == {"challenger", "champion"}  # decided on the tags, as before
