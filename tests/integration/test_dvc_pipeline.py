"""`dvc repro` for real, in a temp git repo holding a copy of the project with tiny params."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import make_dvc_project, project_env, run, write_params


@pytest.fixture(scope="module")
def dvc_project(repro_project):
    root, env, first, _ = repro_project
    return root, env, first


def test_repro_runs_every_stage_and_writes_metrics(dvc_project):
    root, env, first = dvc_project
    for stage in (
        "prepare",
        "validate@washer",
        "distill@washer",
        "psm@washer",
        "evaluate@washer",
        "export@washer",
        "register@washer",
    ):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((root / "reports/metrics/washer.json").read_text())
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env).splitlines()[-1])
    tracked = shown[""]["data"]["reports/metrics/washer.json"]["data"]
    assert {k: tracked[k] for k in ("pixel_ap", "image_auroc", "aupro")} == {
        k: metrics[k] for k in ("pixel_ap", "image_auroc", "aupro")
    }
    registry = json.loads((root / "reports/registry/washer.json").read_text())
    assert registry["model"] == "adps-washer" and "challenger" in registry["aliases"]
    run_tags = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(registry["run_id"]).data.tags
    assert run_tags["git_dirty"] == "false"  # a clean checkout: the run's own outputs do not count


def test_second_repro_is_a_noop_and_status_is_clean(dvc_project):
    root, env, _ = dvc_project
    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again
    assert "up to date" in run(["dvc", "status"], root, env)


def test_a_change_to_the_scorer_makes_evaluate_stale(dvc_project):
    """The scorer lives in adps/model: evaluate@C must rerun when it changes, even if training gives the same bytes."""
    root, env, _ = dvc_project
    scorer = root / "adps/model/network.py"
    original = scorer.read_text()
    scorer.write_text(original + "\n# a changed scorer\n")
    try:
        status = json.loads(run(["dvc", "status", "--json", "evaluate@washer"], root, env).splitlines()[-1])
    finally:
        scorer.write_text(original)
    changed = [d for entry in status["evaluate@washer"] for d in entry.get("changed deps", {})]
    assert any(Path("adps/model/network.py").is_relative_to(dep) for dep in changed), changed  # DVC names the folder
    assert "up to date" in run(["dvc", "status"], root, env)


def test_push_pull_round_trip(dvc_project, tmp_path):
    root, env, _ = dvc_project
    run(["dvc", "remote", "add", "-f", "-d", "scratch", str(tmp_path / "remote")], root, env)
    run(["dvc", "push"], root, env)
    original = tmp_path / "psm.pt"
    shutil.copy(root / "models/washer/psm.pt", original)
    shutil.rmtree(root / "models")
    shutil.rmtree(root / ".dvc/cache")
    run(["dvc", "pull"], root, env)
    assert filecmp.cmp(root / "models/washer/psm.pt", original, shallow=False)
    assert "up to date" in run(["dvc", "status"], root, env)


def test_psm_param_change_reruns_only_psm_evaluate_register(dvc_project):
    root, env, _ = dvc_project
    write_params(
        root,
        data={"categories": ["washer"], "image_size": 64},
        train={"distill": {"epochs": 2, "batch_size": 4}, "psm": {"epochs": 2, "batch_size": 4, "lr": 5e-4}},
    )
    out = run(["dvc", "repro"], root, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"psm@washer", "evaluate@washer", "export@washer", "register@washer"}
    registry = json.loads((root / "reports/registry/washer.json").read_text())
    assert registry["version"] == "2" and registry["created"]


def test_keep_going_holds_back_only_the_category_with_a_bad_new_image(tmp_path):
    """The DVC front-end of the flow's hold-back: validate@washer fails, fabric is trained and registered."""
    root = tmp_path / "project"
    root.mkdir()
    env = project_env(root)
    make_dvc_project(root, env, data={"categories": ["fabric", "washer"]})
    bad = root / "data/incoming/washer/normal/upload.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a truncated upload
    out = subprocess.run(["dvc", "repro", "--keep-going"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "dataset validation failed for washer" in out.stderr + out.stdout
    assert (
        "washer/train/good/upload.png" in out.stderr + out.stdout
        or "washer/test/good/upload.png" in out.stderr + out.stdout
    )
    assert json.loads((root / "reports/registry/fabric.json").read_text())["model"] == "adps-fabric"
    assert not (root / "models/washer").exists()
    status = run(["dvc", "status"], root, env)
    assert "validate@washer" in status and "fabric" not in status
