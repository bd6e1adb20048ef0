"""A model folder holds one model of its own category, or no stage uses it (a real project, a real sqlite registry).

The issue's example: capsule's psm.pt and thresholds.json copied into models/washer. No capsule model is trained
here (the session's trained project holds washer alone): capsule's files are washer's trained psm.pt saved as
`adps psm -c capsule` saves it (``category: capsule``) and the thresholds.json `adps evaluate -c capsule` would
write for it (``category: capsule``, that file's sha256). Every check reads those recorded facts, not the weights.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from adps import paths, stages, tracking
from adps.config import load_params
from adps.errors import AdpsError
from adps.files import file_sha256
from adps.inference import Predictor
from adps.training.checkpoints import read_checkpoint
from tests.conftest import project_env, write_params

FILES = ("models/washer/psm.pt", "models/washer/thresholds.json", "models/washer/student.pt")


@pytest.fixture
def project(trained_project, tmp_path, monkeypatch) -> Path:
    """A copy of the trained project (washer) with its params.yaml, as the working directory; MLflow in its
    own sqlite store (``tracking.uri: sqlite:///mlflow.db``)."""
    root = tmp_path / "project"
    for folder in ("data", "models", "reports"):
        shutil.copytree(trained_project[0] / folder, root / folder)
    write_params(root, data={"categories": ["washer"], "image_size": 64})
    monkeypatch.chdir(root)
    return root


def capsule_files(root: Path, into: Path) -> None:
    """capsule's psm.pt and thresholds.json, as its own stages would have written them, in ``into``."""
    payload = read_checkpoint(root / "models/washer/psm.pt") | {"category": "capsule"}
    torch.save(payload, into / "psm.pt")
    thresholds = json.loads((root / "models/washer/thresholds.json").read_text())
    thresholds.update(category="capsule", checkpoint_sha256=file_sha256(into / "psm.pt"))
    (into / "thresholds.json").write_text(json.dumps(thresholds))


def registry_counts(client: MlflowClient) -> tuple[int, int]:
    """(runs in every experiment, versions of adps-washer)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments)), len(client.search_model_versions("name='adps-washer'"))


def test_another_categorys_model_in_the_folder_is_refused_by_every_stage(project):
    params = load_params(project / "params.yaml")
    first = stages.register(params, "washer")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    before = registry_counts(client)
    version_one = client.get_model_version("adps-washer", first["version"])
    reports = {p: p.read_bytes() for p in (project / "reports").rglob("*") if p.is_file()}
    capsule_files(project, project / "models/washer")

    out = subprocess.run(
        [sys.executable, "-m", "adps.cli", "register", "-c", "washer"],
        cwd=project,
        env=project_env(project) | {"COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = " ".join(out.stderr.split())
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    psm = project / "models/washer/psm.pt"
    assert f"{psm} says category 'capsule', but it lies in washer's model folder" in message
    assert "dvc checkout models/washer" in message and "adps psm -c washer" in message
    assert registry_counts(client) == before == (1, 1)  # no run, no version
    assert client.get_model_version("adps-washer", first["version"]).tags == version_one.tags
    assert tracking.load_registered_predictor("models:/adps-washer@champion").thresholds["category"] == "washer"

    with pytest.raises(AdpsError, match=r"psm.pt says category 'capsule', but it lies in washer's model folder"):
        stages.evaluate(params, "washer")
    with pytest.raises(AdpsError, match=r"psm.pt says category 'capsule'"):
        stages.export(params, "washer")
    assert not (project / "models/washer/model.onnx").exists()
    with pytest.raises(AdpsError, match=r"thresholds.json says category 'capsule', but it lies in washer's model"):
        Predictor.from_dir(project / "models/washer")  # the project's models/washer: the category is known
    assert {p: p.read_bytes() for p in (project / "reports").rglob("*") if p.is_file()} == reports
    student = read_checkpoint(project / "models/washer/student.pt") | {"category": "capsule"}
    torch.save(student, project / "models/washer/student.pt")
    with pytest.raises(AdpsError, match=r"student.pt says category 'capsule', but it lies in washer's"):
        stages.psm(params, "washer")


def test_a_copied_model_folder_keeps_its_own_category_and_a_wrong_version_is_named(project, tmp_path):
    """Outside a project's models/ only the files can say: a folder of capsule's two files is capsule's model.
    A version of adps-washer that holds capsule's model (registered before the check) is refused on load."""
    folder = tmp_path / "deploy"
    folder.mkdir()
    capsule_files(project, folder)
    assert Predictor.from_dir(folder).thresholds["category"] == "capsule"
    params = load_params(project / "params.yaml")
    stages.register(params, "washer")
    capsule_files(project, project / "models/washer")
    tracking.register(params, "washer")  # what the unchecked registration did: version 2 holds capsule's model
    with pytest.raises(AdpsError, match=r"models:/adps-washer/2 holds a model of category 'capsule' .*adps promote"):
        tracking.load_registered_predictor("models:/adps-washer/2")


def test_metrics_or_a_reference_of_another_model_are_refused_by_register(project):
    params = load_params(project / "params.yaml")
    metrics_file, reference_file = paths.metrics_file(params, "washer"), paths.reference_file(params, "washer")
    sha = file_sha256(project / "models/washer/psm.pt")
    metrics = json.loads(metrics_file.read_text())
    assert (metrics["category"], metrics["checkpoint_sha256"]) == ("washer", sha)  # what evaluate records
    metrics_file.write_text(json.dumps(metrics | {"checkpoint_sha256": "0" * 64}))
    with pytest.raises(AdpsError, match=rf"washer.json was measured on another model \(psm.pt sha256 000000000000, "
                                        rf"this folder's {sha[:12]}\): run `adps evaluate -c washer`"):  # fmt: skip
        stages.register(params, "washer")
    metrics_file.write_text(json.dumps(metrics))
    reference = json.loads(reference_file.read_text())
    reference_file.write_text(json.dumps(reference | {"category": "capsule"}))
    with pytest.raises(AdpsError, match=r"reference.json says category 'capsule', not 'washer'"):
        stages.register(params, "washer")
    assert not (project / "mlflow.db").exists()  # refused before the tracking store was touched


ZERO_STD = {"method": "max", "sigma": 2, "topk": 100, "kind": "adps+memory_bank", "normal_stats": {"adps": [0.1, 0]}}
BAD_VALUES = {
    "nan-image": ({"image": math.nan}, r"image is nan, not a finite number"),
    "text-image": ({"image": "0.5"}, r"image is '0.5', not a finite number"),
    "pixel-over-1": ({"pixel": 1.5}, r"pixel is 1.5, not a number in the anomaly map's range \[0, 1\]"),
    "category-number": ({"category": 7}, r"category is 7, not a category name"),
    "short-sha": ({"checkpoint_sha256": "abc"}, r"checkpoint_sha256 is 'abc', not the sha256 of a psm.pt"),
    "negative-sigma": (
        {"score": {"method": "max", "sigma": -1, "topk": 100}},
        r"score this psm.pt cannot use \(score.sigma is -1",
    ),
    "method": ({"score": {"method": "mean", "sigma": 2, "topk": 100}}, r"score this psm.pt cannot use \(score.method"),
    "zero-std": ({"score": ZERO_STD}, r"normal_stats has 'adps': \[0.1, 0\], not a kind with"),
}


@pytest.mark.parametrize(("change", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_thresholds_values_are_checked(project, change, message):
    path = project / "models/washer/thresholds.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))  # NaN is written as JSON's NaN
    with pytest.raises(AdpsError, match=rf"thresholds.json(:| has a) .*{message}.*run `adps evaluate`"):
        Predictor.from_dir(project / "models/washer")
    with pytest.raises(AdpsError, match=message):
        stages.register(load_params(project / "params.yaml"), "washer")
