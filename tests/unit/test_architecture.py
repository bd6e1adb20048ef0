"""Import contracts (pyproject.toml, docs/architecture.md), checked with import-linter on the real code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def copy_code(dest: Path) -> Path:
    for folder in ("adps", "flows"):
        shutil.copytree(REPO_ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_code_keeps_every_import_contract():
    out = lint_imports(REPO_ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("adps/stages.py", "from adps import tuning", "layers"),
        ("adps/model/losses.py", "import mlflow", "mlflow only in adps.tracking"),
        ("adps/tracking.py", "import optuna", "optuna only in adps.tuning"),
        ("adps/evaluation/metrics.py", "import prefect", "prefect only in flows/"),
        ("adps/model/losses.py", "from adps.config import LossParams", "the torch model takes plain arguments"),
        ("adps/model/backbones.py", "from adps.data import images", "layers"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str):
    root = copy_code(tmp_path)
    with (root / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    out = lint_imports(root)
    assert out.returncode != 0
    broken = [row for row in out.stdout.splitlines() if row.rstrip().endswith("BROKEN")]
    assert any(contract.split()[0] in row for row in broken), out.stdout
