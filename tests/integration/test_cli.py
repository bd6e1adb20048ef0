"""The ``adps`` command as a user runs it: real subprocesses in a temp project folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_params

ADPS = [sys.executable, "-m", "adps.cli"]


def adps(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*ADPS, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_help_lists_the_stage_commands(tmp_path):
    out = adps("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in (
        "prepare",
        "validate",
        "distill",
        "psm",
        "evaluate",
        "register",
        "promote",
        "predict",
        "tune",
        "report",
    ):
        assert command in out.stdout
    assert "--params" in adps("prepare", "--help", cwd=tmp_path).stdout


def test_prepare_then_validate_on_a_fresh_folder(tmp_path):
    write_params(tmp_path)
    prepared = adps("prepare", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert len(list((tmp_path / "data/synthetic/fabric/train/good").glob("*.png"))) == 10
    validated = adps("validate", cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    assert {p.parent.name for p in tmp_path.glob("reports/validation/*/summary.json")} == {"fabric", "washer"}
    one = adps("validate", "--category", "washer", cwd=tmp_path)
    assert one.returncode == 0 and '"n_images": 17' in one.stdout


def test_prepare_is_deterministic(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_params(tmp_path / name)
        assert adps("prepare", cwd=tmp_path / name).returncode == 0
    a = (tmp_path / "a/data/synthetic/washer/test/crack/000.png").read_bytes()
    b = (tmp_path / "b/data/synthetic/washer/test/crack/000.png").read_bytes()
    assert a == b


def test_validate_names_each_of_four_broken_files(project):
    """Truncated PNG, a mask on a good image, wrong-size mask, defect in train/good (a defect image
    without its mask is not among them: it is labelled by image only)."""
    data = project / "data/synthetic"
    truncated = data / "fabric/train/good/003.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (data / "fabric/ground_truth/stain/000_mask.png").unlink()
    from PIL import Image

    (data / "fabric/ground_truth/good").mkdir()
    Image.new("L", (64, 64), 0).save(data / "fabric/ground_truth/good/001_mask.png")
    Image.new("L", (20, 20), 255).save(data / "washer/ground_truth/scratch/000_mask.png")
    shutil.copy(data / "washer/test/hole/000.png", data / "washer/train/good/100.png")
    out = adps("validate", cwd=project)
    assert out.returncode == 1
    for name in (
        "fabric/train/good/003.png",
        "fabric/test/good/001.png",
        "washer/test/scratch/000.png",
        "washer/train/good/100.png",
    ):
        assert name in out.stderr, out.stderr
    assert "fabric/test/stain/000.png" not in out.stderr
    assert "dataset validation failed" in out.stderr


def test_bad_params_exit_nonzero_with_the_key(project):
    (project / "bad.yaml").write_text("data:\n  categroies: [fabric]\n")
    out = adps("validate", "--params", "bad.yaml", cwd=project)
    assert out.returncode == 1
    assert "unknown key 'data.categroies'" in out.stderr and "did you mean 'data.categories'" in out.stderr


def test_failed_import_keeps_the_existing_dataset(project):
    before = sorted(p.name for p in (project / "data/synthetic/fabric/train/good").iterdir())
    write_params(project, data={"source": "folder", "import_path": str(project / "nowhere")})
    out = adps("prepare", cwd=project)
    assert out.returncode == 1 and "no normal images in" in out.stderr
    assert sorted(p.name for p in (project / "data/synthetic/fabric/train/good").iterdir()) == before
    assert not (project / "data/folder").exists()
