"""Optuna tuning for real: sqlite storage, MLflow parent + nested runs, pruning, resume, apply."""

from __future__ import annotations

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from adps import paths, tuning
from adps.config import ParamsError, override_params
from adps.errors import AdpsError
from adps.tuning import apply_best_params, load_study
from tests.conftest import REPO_ROOT, tiny_params

SPACE = {
    "loss.push_weight": {"type": "float", "low": 0.5, "high": 2.0},
    "train.psm.lr": {"type": "float", "low": 1.0e-7, "high": 3.0e-3, "log": True},
    "score.method": {"type": "categorical", "choices": ["max", "topk"]},
    "threshold.strategy": {"type": "categorical", "choices": ["f1", "percentile"]},
}


def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


def tune_params(tmp_path, **tune):
    cfg = {
        "n_trials": 3,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "objective": "pixel_ap",
        "pruner": "none",
        "budget": {"distill_epochs": 1, "psm_epochs": 2},
        "space": SPACE,
        **tune,
    }
    return tiny_params(
        tune=cfg, data={"categories": ["washer"], "image_size": 64}, tracking={"uri": tracking_uri(tmp_path)}
    )


@pytest.fixture
def tuning_project(project, tmp_path):
    """The tiny project with the test split replaced by unreadable files: tuning must never need it."""
    test_files = [p for p in (project / "data/synthetic/washer").rglob("*.png") if "train" not in p.parts]
    for path in test_files:
        path.write_bytes(b"not an image: the test split must not be read during tuning")
    return project, MlflowClient(tracking_uri(tmp_path))


def runs_of(client, study: str):
    experiment = client.get_experiment_by_name("adps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("optuna_study") == study]
    children = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents, children


def test_three_trial_study_then_resume(tuning_project, tmp_path):
    _, client = tuning_project
    params = tune_params(tmp_path)
    result = tuning.tune(params, "washer")
    study = load_study(params, "washer")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # test files never read
    best = yaml.safe_load(paths.best_params_file(tiny_params(), "washer").read_text())
    assert set(result["best_params"]) == set(SPACE)
    override_params(tiny_params(), result["best_params"])  # valid against the params schema
    assert best["loss"]["push_weight"] == result["best_params"]["loss.push_weight"]
    assert best["train"]["psm"]["lr"] == result["best_params"]["train.psm.lr"]
    parents, children = runs_of(client, "adps-washer")
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["state"] for c in children} == {"COMPLETE"}
    assert all("value" in c.data.metrics and "duration_s" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"optimization_history.png", "best_params.yaml"} <= artifacts
    assert "dvc exp run -S 'loss.push_weight=" in result["dvc_exp_run"]

    again = tuning.tune(params, "washer", n_trials=2, workers=2)  # two processes share the study
    assert again["n_trials"] == 5
    parents, children = runs_of(client, "adps-washer")
    assert len(parents) == 1 and len(children) == 5


def test_pruner_stops_a_deliberately_bad_trial(tuning_project, tmp_path):
    params = tune_params(tmp_path, pruner="median", pruner_warmup_epochs=0, study_name="prune")
    study = load_study(params, "washer")
    distributions = {"loss.push_weight": optuna.distributions.FloatDistribution(0.5, 2.0)}
    for _ in range(2):  # two good trials already in the study
        study.add_trial(
            optuna.trial.create_trial(
                params={"loss.push_weight": 1.0},
                distributions=distributions,
                value=0.99,
                intermediate_values={1: 0.99, 2: 0.99},
            )
        )
    study.enqueue_trial(
        {"train.psm.lr": 1.0e-7, "loss.push_weight": 1.0, "score.method": "max", "threshold.strategy": "f1"}
    )
    result = tuning.tune(params, "washer", n_trials=1)
    assert result["states"] == {"COMPLETE": 2, "PRUNED": 1}
    last = load_study(params, "washer").trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED and list(last.intermediate_values) == [1]


def test_failing_trial_is_recorded_as_failed(tuning_project, tmp_path):
    with pytest.raises(ParamsError, match=r"tune.space.model.patches: choice 3 cannot be used"):  # caught at load
        tune_params(tmp_path, space={**SPACE, "model.patches": {"type": "categorical", "choices": [3]}})
    never_anomalous = {"type": "categorical", "choices": [0.999]}  # valid, but no synthetic anomaly is ever drawn
    params = tune_params(tmp_path, space={**SPACE, "anomalies.perlin_threshold": never_anomalous}, study_name="fail")
    with pytest.raises(AdpsError, match="no completed trial"):
        tuning.tune(params, "washer", n_trials=1)
    assert load_study(params, "washer").trials[0].state == optuna.trial.TrialState.FAIL


def test_apply_writes_best_params_and_keeps_comments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params_path = tmp_path / "params.yaml"
    params_path.write_text((REPO_ROOT / "params.yaml").read_text())
    paths.best_params_file(tiny_params(), "fabric").parent.mkdir(parents=True)
    paths.best_params_file(tiny_params(), "fabric").write_text("loss:\n  push_weight: 0.42\nscore:\n  method: topk\n")
    result = apply_best_params(params_path, "fabric")
    text = params_path.read_text()
    assert result["applied"] == {"loss.push_weight": 0.42, "score.method": "topk"}
    assert "push_weight: 0.42" in text and "# weight of the push term" in text
    raw = yaml.safe_load(text)
    assert raw["loss"]["push_weight"] == 0.42 and raw["score"]["method"] == "topk"
    with pytest.raises(AdpsError, match=r"adps tune --category wood"):
        apply_best_params(params_path, "wood")
    before = params_path.read_text()
    paths.best_params_file(tiny_params(), "fabric").write_text("synthesis:\n  beta_max: 0.5\n")  # an older study
    with pytest.raises(AdpsError, match=r"best_params.yaml names parameters .*'synthesis.beta_max' \(now 'anomalies"):
        apply_best_params(params_path, "fabric")
    assert params_path.read_text() == before


def test_worker_processes_share_the_cores_unless_threads_are_set(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # what runtime.threads: 0 means in this process
    shared = tune_params(tmp_path)
    auto = override_params(shared, {"runtime.threads": 0})
    assert [tuning.worker_threads(auto, n) for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    fixed = override_params(shared, {"runtime.threads": 3})
    assert tuning.worker_threads(fixed, 2) == 3  # an explicit count is what the user asked for
