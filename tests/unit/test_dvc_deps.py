"""dvc.yaml's code dependencies follow the code: a stage lists every source file it runs.

Otherwise a change to that code leaves the stage "up to date" and its outputs describe code that no
longer runs (seen: the image scorer in adps/model was not a dependency of evaluate@C).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.stage_code import REPO_ROOT, stage_files

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: str) -> list[str]:
    definition = STAGES[stage].get("do", STAGES[stage])
    return [d for d in definition["deps"] if d.startswith("adps")]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or Path(path).is_relative_to(dep) for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_every_file_it_runs(stage):
    missing = sorted(p for p in stage_files(stage) if not covered(p, code_deps(stage)))
    assert not missing, f"dvc.yaml stage {stage} runs these files but does not list them under deps: {missing}"
    assert all((REPO_ROOT / dep).exists() for dep in code_deps(stage))


def test_the_analysis_sees_what_the_scorer_and_the_importer_live_in():
    """The two files the bug report named: the scorer (model) for evaluate, the layout for every data stage."""
    assert "adps/model/network.py" in stage_files("evaluate")
    assert {"adps/data/layout.py", "adps/data/images.py"} <= stage_files("prepare")
    assert "adps/data/images.py" in stage_files("distill") and "adps/tracking.py" not in stage_files("distill")


def test_register_depends_on_the_code_bundled_into_the_model():
    """The registered model carries its serving code: a change to it must make register@C stale."""
    from adps.tracking import served_code

    bundled = [str(p.relative_to(REPO_ROOT)) for p in served_code()]
    assert "adps/inference.py" in bundled and "adps/data/images.py" in bundled and "adps/tuning.py" not in bundled
    assert [p for p in bundled if not covered(p, code_deps("register"))] == []
