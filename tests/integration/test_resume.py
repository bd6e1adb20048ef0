"""Interrupting a training process and running it again resumes from the last saved epoch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from adps.training.checkpoints import read_checkpoint
from tests.conftest import write_params

EPOCHS = 10


def start_distill(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "adps.cli", "distill", "--category", "fabric"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def make_project(root: Path, data: Path) -> Path:
    shutil.copytree(data, root / "data" / "synthetic")
    write_params(root, train={"distill": {"epochs": EPOCHS, "batch_size": 4}, "psm": {"epochs": 1}})
    return root


def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_dataset_master):
    interrupted = make_project(tmp_path / "a", tiny_dataset_master)
    resume_file = interrupted / "models/fabric/.student.resume.pt"
    proc = start_distill(interrupted)
    deadline = time.time() + 120
    while time.time() < deadline and not (resume_file.exists() and read_epoch(resume_file) >= 2):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_epoch(resume_file)
    assert 2 <= killed_at < EPOCHS, "training finished before it could be interrupted"
    assert not (interrupted / "models/fabric/student.pt").exists()

    rerun = subprocess.run(
        [sys.executable, "-m", "adps.cli", "distill", "--category", "fabric"],
        cwd=interrupted,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from epoch {killed_at}" in rerun.stderr
    assert f"distill epoch {killed_at}/{EPOCHS}" not in rerun.stderr  # earlier epochs not redone
    assert not resume_file.exists()

    clean = make_project(tmp_path / "b", tiny_dataset_master)
    assert (
        subprocess.run(
            [sys.executable, "-m", "adps.cli", "distill", "--category", "fabric"],
            cwd=clean,
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    resumed_history = json.loads((interrupted / "reports/train/fabric/distill.json").read_text())
    clean_history = json.loads((clean / "reports/train/fabric/distill.json").read_text())
    assert [h["epoch"] for h in resumed_history] == list(range(1, EPOCHS + 1))
    for a, b in zip(resumed_history, clean_history, strict=True):
        assert abs(a["loss_distill"] - b["loss_distill"]) < 1e-5


def read_epoch(path: Path) -> int:
    try:
        return int(read_checkpoint(path)["epoch"])
    except Exception:  # being replaced at this instant: try again
        return 0
