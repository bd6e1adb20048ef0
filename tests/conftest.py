"""Shared fixtures: tiny params, a tiny generated dataset, a temp project folder to run stages in."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import adps  # noqa: F401  (turns telemetry off for every tool before anything else imports them)
from adps.config import Params, params_from_dict
from adps.data.embedded import generate_category
from adps.runtime import CPU_KERNEL_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "runtime": {"seed": 7, "progress": False},
    "data": {"source": "synthetic", "categories": ["fabric", "washer"], "image_size": 64},
    "synthetic": {"image_size": 64, "n_train": 10, "n_test_good": 2, "n_test_defect": 1},
    "anomalies": {"n_procedural_textures": 4},
    "validation": {"min_train": 5},
    "model": {"teacher_weights": "none", "psm_head_channels": [8, 8]},
    "train": {
        "distill": {"epochs": 2, "batch_size": 4},
        "psm": {"epochs": 2, "batch_size": 4},
    },
    "evaluation": {"batch_size": 8, "n_heatmaps": 2, "curve_points": 20},
}


def pytest_configure(config: pytest.Config) -> None:
    """The kernels every stage asks for (``runtime.cpu_kernels: avx2``), chosen before any test computes with
    torch: a stage run in this process gives the same bytes as the same stage run by `dvc repro` in a new one."""
    os.environ.update(CPU_KERNEL_ENV["avx2"])


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params(**sections: dict[str, Any]) -> Params:
    return params_from_dict(merge(TINY, sections))


def write_params(folder: Path, **sections: dict[str, Any]) -> Path:
    """A complete params.yaml (the project's, with the tiny settings and ``sections`` merged in)."""
    full = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(merge(merge(full, TINY), sections)))
    return path


@pytest.fixture(autouse=True)
def no_outside_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own MLflow store (params or their own env); never the caller's shell setting."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def tiny_dataset_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic dataset, generated once per session (``data/synthetic/<category>``)."""
    root = tmp_path_factory.mktemp("tiny") / "data" / "synthetic"
    params = tiny_params()
    for category in params.data.categories:
        generate_category(category, params.synthetic, params.runtime.seed, root / category)
    return root


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_master: Path) -> tuple[Path, dict]:
    """A temp project where category washer was trained and evaluated once (tiny params)."""
    from adps import stages

    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_dataset_master, root / "data" / "synthetic")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        results = {
            stage.__name__: stage(tiny_params(), "washer") for stage in (stages.distill, stages.psm, stages.evaluate)
        }
    return root, results


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dataset_master: Path) -> Path:
    """A temp project folder (the cwd) with tiny params.yaml and a fresh copy of the tiny dataset."""
    shutil.copytree(tiny_dataset_master, tmp_path / "data" / "synthetic")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def project_env(root: Path) -> dict[str, str]:
    """Environment for subprocesses run in a temp project: this venv's tools first, local stores only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    home = root.parent / f"{root.name}-home"  # tools' caches (~/.cache/matplotlib...) stay out of the repo
    home.mkdir(exist_ok=True)
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="t@example.com",
        HOME=str(home),
        COLUMNS="250",
    )
    return env


PROJECT_FILES = (
    "adps",
    "flows",
    "scripts",
    "dvc.yaml",
    "prefect.yaml",
    "data/incoming",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, fail the test with its output when it fails; returns stdout + stderr."""
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def make_dvc_project(root: Path, env: dict[str, str], **params: dict[str, Any]) -> Path:
    """A git repo with the project's code, dvc.yaml and DVC config, and tiny params (one category)."""
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    write_params(root, **merge({"data": {"categories": ["washer"], "image_size": 64}}, params))
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project"], root, env)
    return root


def output_digests(root: Path, category: str = "washer") -> dict[str, str]:
    """sha256 of a category's model files and metrics, and DVC's md5 of its model outs in dvc.lock.

    Two runs of the same params compare equal on all of them (the training-history plots, which hold
    wall-clock seconds, are left out).
    """
    files = [root / "models" / category / name for name in ("student.pt", "psm.pt", "thresholds.json")]
    files.append(root / "reports" / "metrics" / f"{category}.json")
    digests = {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in (f"distill@{category}", f"psm@{category}", f"evaluate@{category}"):
        for out in lock[stage]["outs"]:
            if out["path"].startswith("models/"):
                digests[f"dvc.lock {out['path']}"] = out["md5"]
    return digests


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str, dict[str, str]]:
    """A tiny DVC project (washer) after one `dvc repro`: (root, env, its output, digests of its outputs)."""
    root = tmp_path_factory.mktemp("dvcproj")
    env = project_env(root)
    make_dvc_project(root, env)
    out = run(["dvc", "repro"], root, env)
    return root, env, out, output_digests(root)
