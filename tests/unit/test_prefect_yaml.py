"""prefect.yaml (workers) declares the same deployments as flows/serve.py (`make up`): one set of facts."""

from __future__ import annotations

import yaml

from flows.serve import deployments
from tests.conftest import REPO_ROOT


def test_prefect_yaml_matches_the_served_deployments():
    declared = {d["name"]: d for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]}
    served = {d.name: d for d in deployments(str(REPO_ROOT / "params.yaml"))}
    assert declared.keys() == served.keys()
    for name, deployment in served.items():
        entry = declared[name]
        assert entry["work_pool"]["name"] == "adps"
        assert entry["entrypoint"] == deployment.entrypoint
        assert entry["description"] == deployment.description
        assert entry["parameters"] == {"params_path": "params.yaml"}
        crons = [s["cron"] for s in entry.get("schedules", [])]
        assert crons == [s.schedule.cron for s in deployment.schedules or []]
        triggers = [(t["name"], set(t["expect"]), t["match"]) for t in entry.get("triggers", [])]
        assert triggers == [(t.name, set(t.expect), t.match.model_dump()) for t in deployment.triggers]
        options = deployment.concurrency_options
        limit = options and {"limit": deployment.concurrency_limit, "collision_strategy": options.collision_strategy}
        assert entry.get("concurrency_limit") == limit
