"""Native resolution end to end: a high-resolution, non-square category through `dvc repro`, `adps predict`
(PyTorch and ONNX Runtime) and the served model over REST, with maps at each image's own size."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adps import paths
from adps.config import load_params
from tests.conftest import make_dvc_project, project_env, run
from tests.servers import free_port, start, stop, wait_until_up

# strips of 96 x 192 at a 64 px training input: native by default (auto), 3 x 2 patches of 16 px on a side
STRIP = {"data": {"categories": ["strip"], "image_size": 64}, "synthetic": {"strip_height": 192, "strip_width": 96}}
SIZES = ((230, 630), (1000, 1000))  # (width, height): a KolektorSDD2-like strip and a square frame
MAP_TOLERANCE = 1e-4


def tiled_inputs(root: Path, folder: Path) -> list[Path]:
    """Images of each of :data:`SIZES`, tiled from a strip test image with a defect."""
    source = np.asarray(Image.open(sorted((root / "data/synthetic/strip/test/scratch").glob("*.png"))[0]))
    folder.mkdir()
    written = []
    for width, height in SIZES:
        reps = (math.ceil(height / source.shape[0]), math.ceil(width / source.shape[1]), 1)
        Image.fromarray(np.tile(source, reps)[:height, :width]).save(folder / f"{width}x{height}.png")
        written.append(folder / f"{width}x{height}.png")
    return written


def predicted(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv") as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


def served_predictions(root: Path, env: dict[str, str], images: list[Path], log: Path) -> list[dict]:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    port = free_port()
    serve = ["mlflow", "models", "serve", "-m", "models:/adps-strip@challenger", "--env-manager", "local"]
    server = start([*serve, "--host", "127.0.0.1", "-p", str(port)], root, {**env, "MLFLOW_TRACKING_URI": uri}, log)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log, timeout=180)
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        payload = {"instances": encoded, "params": {"return_map": True}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)["predictions"]
    finally:
        stop(server)


def test_a_high_resolution_strip_is_trained_evaluated_and_served_at_its_own_resolution(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    env = project_env(root)
    make_dvc_project(root, env, **STRIP)
    run(["dvc", "repro"], root, env)
    params = load_params(root / "params.yaml")
    spec = torch.load(paths.psm_checkpoint(params, "strip"), weights_only=True)["spec"]
    assert (spec["image_size"], spec["resolution"], spec["scale"]) == (64, "auto", 1.0)
    heatmap = Image.open(next(paths.heatmaps_dir(params, "strip").glob("*.png")))
    assert heatmap.size == (4 * 96 + 3 * 4, 192 + 14)  # image | truth | map | decision at the image's own size

    images = tiled_inputs(root, tmp_path / "inputs")
    outputs = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"out-{engine}"
        run(["adps", "predict", "--model", "models/strip", "--input", str(tmp_path / "inputs"), "--output", str(out),
             "--engine", engine, "--save-maps", str(out / "maps")], root, env)  # fmt: skip
        outputs[engine] = predicted(out)
        for width, height in SIZES:
            assert np.load(out / "maps" / f"{width}x{height}.png.npy").shape == (height, width)
    for name, row in outputs["torch"].items():
        other = outputs["onnx"][name]
        assert row["error"] == other["error"] == "" and row["is_anomalous"] == other["is_anomalous"]
        assert abs(float(row["score"]) - float(other["score"])) < MAP_TOLERANCE
        torch_map = np.load(tmp_path / "out-torch/maps" / f"{name}.npy")
        onnx_map = np.load(tmp_path / "out-onnx/maps" / f"{name}.npy")
        assert np.abs(torch_map - onnx_map).max() < MAP_TOLERANCE

    served = served_predictions(root, env, images, tmp_path / "serve.log")
    for path, row in zip(images, served, strict=True):
        local = outputs["torch"][path.name]
        assert row["error"] == "" and str(row["is_anomalous"]) == local["is_anomalous"]
        assert abs(row["score"] - float(local["score"])) < MAP_TOLERANCE
        served_map = Image.open(io.BytesIO(base64.b64decode(row["map_png"])))
        assert served_map.size == Image.open(path).size  # the map at the input's own size
        width, height = served_map.size
        for region in json.loads(row["regions"]):  # regions in the input image's pixels
            assert 0 <= region["x"] < region["x"] + region["width"] <= width
            assert 0 <= region["y"] < region["y"] + region["height"] <= height
