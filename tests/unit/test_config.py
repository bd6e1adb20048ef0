from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from adps.config import Params, ParamsError, flatten_params, load_params, params_from_dict
from tests.conftest import REPO_ROOT


def test_repo_params_file_loads_and_is_complete():
    """params.yaml names every parameter explicitly (no silent defaults)."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = load_params(REPO_ROOT / "params.yaml")
    defaults = set(flatten_params(Params()))
    assert defaults == {k for k in flatten_params(params) if not k.startswith("tune.space.")}
    assert params.tune.space, "the default search space lives in params.yaml"

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    assert set(keys(raw)) == set(flatten_params(params))


def test_params_are_frozen():
    params = Params()
    with pytest.raises(ValidationError, match="frozen"):
        params.runtime.seed = 3  # type: ignore[misc]


def test_typo_names_key_and_suggests_the_right_one():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"data": {"imge_size": 128}})
    message = str(err.value)
    assert "unknown key 'data.imge_size'" in message
    assert "did you mean 'data.image_size'" in message


def test_unknown_section_lists_allowed_sections():
    with pytest.raises(ParamsError, match=r"unknown key 'trian'.*allowed here: runtime, data"):
        params_from_dict({"trian": {}})


def test_a_renamed_section_names_its_new_name(tmp_path: Path):
    old = tmp_path / "params.yaml"
    old.write_text("synthesis:\n  normal_prob: 0.3\n")  # the training-anomaly section before its rename
    with pytest.raises(ParamsError, match=r"'synthesis' was renamed 'anomalies': rename it in the params file"):
        load_params(old)
    tuned = {"tune": {"space": {"synthesis.beta_max": {"type": "float", "low": 0.5, "high": 0.9}}}}
    with pytest.raises(ParamsError, match=r"'synthesis.beta_max' \(did you mean 'anomalies.beta_max'\?\)"):
        params_from_dict(tuned)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"data": {"image_size": 100}}, "data.image_size: Input should be a multiple of 32 (got 100)"),
        ({"data": {"source": "imagenet"}}, "data.source: Input should be 'synthetic', 'mvtec', 'kolektor' or 'folder'"),
        ({"anomalies": {"normal_prob": 1.5}}, "anomalies.normal_prob: Input should be less than or equal to 1"),
        ({"data": {"categories": ["fabric", "marble"]}}, "unknown synthetic categories ['marble']"),
        ({"data": {"import_path": None}}, "data.import_path: "),
        ({"runtime": {"seed": "abc"}}, "runtime.seed: Input should be a valid integer"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw, fragment):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    assert fragment in str(err.value)


def test_missing_file_says_what_to_do(tmp_path: Path):
    with pytest.raises(ParamsError, match="params file not found.*--params"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path: Path):
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="p.yaml is not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"loss.push_weight": {"type": "float", "low": 0.0, "high": 3.0, "log": True}},
            "tune.space.loss.push_weight: a log range must start above 0 (got low 0.0)",
        ),
        (
            {"score.topk": {"type": "float", "low": 10, "high": 100}},  # a trial would draw 55.5 for an int
            "tune.space.score.topk: a value 55.5 cannot be used: score.topk: Input should be a valid integer",
        ),
        (
            {"score.method": {"type": "categorical", "choices": ["max", "mean"]}},
            "tune.space.score.method: choice 'mean' cannot be used: score.method: Input should be 'max' or 'topk'",
        ),
        (
            {"loss.focal_alpha": {"type": "float", "low": 0.1, "high": 1.5}},  # focal alpha lies in (0, 1)
            "tune.space.loss.focal_alpha: high 1.5 cannot be used: loss.focal_alpha: Input should be less than 1",
        ),
        (
            {"data.image_size": {"type": "int", "low": 64, "high": 256}},  # only multiples of 32
            "tune.space.data.image_size: a value 65 cannot be used: data.image_size: Input should be a multiple of 32",
        ),
    ],
)
def test_a_search_space_that_cannot_run_fails_at_load_naming_the_key(entry, message):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["tune"]["space"] = entry
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    assert message in str(err.value)


def test_the_shipped_search_space_passes_the_same_checks():
    assert len(load_params(REPO_ROOT / "params.yaml").tune.space) == 12


def test_search_space_entries_a_trial_cannot_use_and_keys_written_twice_are_refused(tmp_path: Path):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for entry, message in (
        ({"score.sigma": {"type": "float", "low": 0, "high": float("inf")}}, "Input should be a finite number"),
        ({"train.psm.epochs": {"type": "int", "low": 1, "high": 5}}, "every trial trains tune.budget.psm_epochs"),
        ({"runtime.seed": {"type": "int", "low": 1, "high": 5}}, "runtime settings are not hyperparameters"),
    ):
        raw["tune"]["space"] = entry
        with pytest.raises(ParamsError, match=message):
            params_from_dict(raw)
    text = (REPO_ROOT / "params.yaml").read_text().replace("  seed: 42 ", "  seed: 42\n  seed: 43 ", 1)
    (tmp_path / "twice.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"twice.yaml is not valid YAML: key 'seed' is written twice"):
        load_params(tmp_path / "twice.yaml")
