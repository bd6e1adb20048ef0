"""Same params + same data -> the same weights, files and metrics (CPU, same thread count)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from adps import paths, stages
from adps.training.checkpoints import read_checkpoint
from tests.conftest import tiny_params

OUTPUTS = ("student.pt", "psm.pt", "thresholds.json")


def train_and_evaluate(root: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    shutil.copytree(dataset, root / "data" / "synthetic")
    monkeypatch.chdir(root)
    params = tiny_params()
    for stage in (stages.distill, stages.psm, stages.evaluate):
        stage(params, "washer")
    files = [paths.model_dir(params, "washer") / name for name in OUTPUTS] + [paths.metrics_file(params, "washer")]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_training_twice_gives_identical_weights_files_and_metrics(tmp_path, tiny_dataset_master, monkeypatch):
    first = train_and_evaluate(tmp_path / "a", tiny_dataset_master, monkeypatch)
    weights = read_checkpoint(paths.psm_checkpoint(tiny_params(), "washer"))["state"]
    second = train_and_evaluate(tmp_path / "b", tiny_dataset_master, monkeypatch)
    again = read_checkpoint(paths.psm_checkpoint(tiny_params(), "washer"))["state"]
    assert weights.keys() == again.keys()
    for key in weights:
        assert torch.equal(weights[key], again[key]), key
    assert first == second  # byte-identical checkpoints, thresholds and metrics: equal DVC hashes too
