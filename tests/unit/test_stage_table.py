"""dvc.yaml follows the stage table in adps/stages.py: names and order, params, outputs.

dvc.yaml stays a file users read and edit; this test is what keeps it equal to the table the CLI and
the Prefect flow are built from (code deps: tests/unit/test_dvc_deps.py).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from adps import paths
from adps.config import Params
from adps.stages import PIPELINE, phase_fingerprint
from tests.conftest import REPO_ROOT, tiny_params

CATEGORY = "washer"


def rendered(template: str, params: Params) -> str:
    """A dvc.yaml path with its templates filled in for :data:`CATEGORY`."""
    values = {"item": CATEGORY, "data.source": params.data.source, "data.import_path": str(params.data.import_path)}
    for key, value in values.items():
        template = template.replace(f"${{{key}}}", value)
    return template


def declared_outs(body: dict[str, Any], params: Params) -> set[str]:
    entries = [e for key in ("outs", "metrics", "plots") for e in body.get(key, [])]
    return {rendered(next(iter(e)) if isinstance(e, dict) else e, params) for e in entries}


def differences(pipeline: dict[str, Any], params: Params) -> list[str]:
    """Where a dvc.yaml document disagrees with the stage table (empty when they agree)."""
    problems = []
    names, table = list(pipeline["stages"]), [stage.name for stage in PIPELINE]
    if names != table:
        problems.append(f"stages and order: dvc.yaml {names}, table {table}")
    for stage in PIPELINE:
        entry = pipeline["stages"].get(stage.name)
        if entry is None:
            continue
        body = entry.get("do", entry)
        if ("foreach" in entry) != stage.per_category:
            problems.append(f"{stage.name}: per category in the table: {stage.per_category}")
        if list(body.get("params", [])) != list(stage.params):
            problems.append(f"{stage.name} params: dvc.yaml {body.get('params', [])}, table {list(stage.params)}")
        expected = {paths.in_project(params, p) for p in stage.outs(params, CATEGORY)}
        if declared_outs(body, params) != expected:
            problems.append(
                f"{stage.name} outs: dvc.yaml {sorted(declared_outs(body, params))}, table {sorted(expected)}"
            )
    return problems


def dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def test_dvc_yaml_follows_the_stage_table():
    assert differences(dvc_yaml(), tiny_params().at(REPO_ROOT)) == []


def test_a_dvc_yaml_that_disagrees_with_the_table_is_caught():
    params = tiny_params().at(REPO_ROOT)
    wrong = copy.deepcopy(dvc_yaml())
    stages = wrong["stages"]
    stages["psm"]["do"]["params"].remove("loss")  # a param the stage reads, forgotten
    stages["evaluate"]["do"]["outs"][0] = {"models/${item}/thresholds.yaml": {"persist": True}}  # a renamed output
    wrong["stages"] = {"distill": stages.pop("distill"), **stages}  # out of order
    found = differences(wrong, params)
    assert any(p.startswith("stages and order") for p in found)
    assert any(p.startswith("psm params") for p in found)
    assert any(p.startswith("evaluate outs") and "thresholds.yaml" in p for p in found)


def test_a_phase_fingerprint_hashes_exactly_the_params_its_stage_lists():
    base = tiny_params()

    def stamps(**sections: Any) -> dict[str, str]:
        params = tiny_params(**sections)
        return {phase: phase_fingerprint(params, CATEGORY, phase, []) for phase in ("distill", "psm")}

    before = stamps()
    # listed by both training stages (dvc.yaml: anomalies) -> both change
    assert all(before[p] != stamps(anomalies={"beta_max": 0.7})[p] for p in before)
    # loss.focal_gamma: read by psm only (distill lists push_weight, push_floor, mask_threshold)
    changed = stamps(loss={"focal_gamma": 3.0})
    assert changed["distill"] == before["distill"] and changed["psm"] != before["psm"]
    # listed by neither (an evaluation setting, a validation setting) -> neither changes
    assert stamps(score={"sigma": 3.0}, validation={"min_side": 16}) == before
    assert base.score.sigma != 3.0


def test_a_phase_fingerprint_follows_the_contents_of_the_files_it_reads(tmp_path):
    from adps.data.layout import Sample

    image, texture = tmp_path / "train" / "000.png", tmp_path / "textures" / "t.png"
    for path in (image, texture):
        path.parent.mkdir()
        path.write_bytes(b"first")
    params = tiny_params(anomalies={"texture_dir": str(texture.parent)}).at(tmp_path)
    train = [Sample("washer", "train", 0, "good", image, None)]

    def stamp(weights: str = "file w.pth (sha256 aa)") -> str:
        return phase_fingerprint(params, CATEGORY, "distill", train, weights)

    before = stamp()
    image.write_bytes(b"second")  # prepare rewrote the image under the same name
    after_image = stamp()
    texture.write_bytes(b"second")
    after_texture = stamp()
    assert len({before, after_image, after_texture, stamp("file w.pth (sha256 bb)")}) == 4
