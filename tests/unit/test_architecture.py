"""Import rules (docs/architecture.md): compute layers import no orchestration or tracking tool; only flows/ imports
prefect."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

TOOLS = {"prefect", "mlflow", "dvc", "optuna", "great_expectations"}
PURE = ("adps/model", "adps/training", "adps/evaluation", "adps/data")
GX_MODULE = "adps/data/validation.py"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def modules(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def test_compute_layers_import_no_orchestration_or_tracking_tool():
    for folder in PURE:
        for path in modules(folder):
            allowed = {"great_expectations"} if path.relative_to(REPO_ROOT).as_posix() == GX_MODULE else set()
            assert not (imported_roots(path) & (TOOLS - allowed)), path


def test_only_flows_import_prefect_and_adps_never_imports_flows():
    for path in modules("adps"):
        roots = imported_roots(path)
        assert "prefect" not in roots, path
        assert "flows" not in roots, path
