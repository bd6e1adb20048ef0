"""Inference speed of one model three ways, in one run on the same images, and predict's memory.

    python benchmarks/serve.py --category capsule            # after make run (dvc repro exports model.onnx)

Rows: PyTorch eager and ONNX Runtime on decoded, resized images (model time only), and the REST
endpoint of the registered champion (``mlflow models serve``; base64 PNG in, JSON out: decode,
model, regions and HTTP included), each at batch 1 and 8, as ms/image and images/s, with the same
thread count. The prediction log's cost: files decoded and scored with and without recording each
prediction (rows to a SQLite log, flagged inputs kept), and the REST endpoint with the log off and on.
Then the peak RSS of ``adps predict`` on 200 and on 2,000 images (copies of the test images), which
stays flat when prediction streams.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from adps import paths
from adps.config import load_params
from adps.data.images import load_rgb
from adps.export import onnx_predictor
from adps.inference import ImageSource, Predictor
from adps.production.log import LogSettings, PredictionLog

BATCHES = (1, 8)


def model_ms_per_image(predictor: Predictor, images: list, batch: int, repeats: int) -> float:
    """Best of ``repeats`` passes over the images, in ms per image (the first batch warms up)."""
    predictor.predict_arrays(images[:batch])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images) - batch + 1, batch):
            predictor.predict_arrays(images[i : i + batch])
        best = min(best, (time.perf_counter() - start) / (len(images) // batch * batch))
    return best * 1000


def recorded_ms_per_image(predictor: Predictor, files: list[Path], batch: int, repeats: int, log=None) -> float:
    """Best of ``repeats`` passes of decode + model (+ recording in ``log``), in ms per image."""
    sources = [ImageSource(str(f), path=f) for f in files]

    def one_pass() -> None:
        for i in range(0, len(sources) - batch + 1, batch):
            results = predictor.predict_batch(sources[i : i + batch])
            if log is not None:
                log.record(results, sources[i : i + batch], predictor.thresholds)

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = min(best, (time.perf_counter() - start) / (len(sources) // batch * batch))
    if log is not None:
        log.flush(60)
    return best * 1000


def log_rows(predictor: Predictor, files: list[Path], repeats: int) -> list[tuple[str, int, float]]:
    """The same files decoded and scored without and with the prediction log (a SQLite file, inputs kept)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = LogSettings(f"sqlite:///{tmp}/predictions.db", Path(tmp) / "review", True, 0.02, 2**30)
        log = PredictionLog(settings, "predict", "benchmark")
        for batch in BATCHES:
            rows.append(("decode + PyTorch, no log", batch, recorded_ms_per_image(predictor, files, batch, repeats)))
            rows.append(("decode + PyTorch + log", batch, recorded_ms_per_image(predictor, files, batch, repeats, log)))
        print(f"log: {log.counts}")
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(category: str, threads: int, port: int, log: str = "off") -> subprocess.Popen:
    """The champion behind ``mlflow models serve``; ``log``: its prediction log URL, or off."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # its workers call mlflow
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PATH": path, "ADPS_PREDICTION_LOG": log}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/adps-{category}@champion",
         "--env-manager", "local",
         "--host", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return server
        except OSError:
            time.sleep(1)
    raise RuntimeError("mlflow models serve did not start within 180 s")


def rest_ms_per_image(port: int, files: list[Path], batch: int, repeats: int) -> float:
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]

    def call(rows: list[str]) -> None:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=120).read()

    call(encoded[:batch])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(encoded) - batch + 1, batch):
            call(encoded[i : i + batch])
        best = min(best, (time.perf_counter() - start) / (len(encoded) // batch * batch))
    return best * 1000


def predict_peak_rss_mb(model: Path, files: list[Path], count: int, threads: int) -> float:
    """Peak RSS of an ``adps predict`` process on ``count`` images (copies of ``files``)."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for i in range(count):
            shutil.copy(files[i % len(files)], inputs / f"{i:05d}.png")
        probe = (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        adps = str(Path(sys.executable).with_name("adps"))
        command = [sys.executable, "-c", probe, adps, "predict", "--model", str(model), "--input", str(inputs),
                   "--output", str(Path(tmp) / "out"), "--device", "cpu"]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})  # fmt: skip
        return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="capsule")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-rest", action="store_true", help="leave out the REST rows (no registry)")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the predict memory rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    folder = paths.model_dir(params, args.category)
    files = sorted(paths.category_dir(params, args.category).glob("test/*/*.png"))
    torch_predictor = Predictor.from_dir(folder, "cpu")
    onnx_model = onnx_predictor(folder, args.threads)
    images = [load_rgb(f, torch_predictor.geometry) for f in files]
    rows = []
    for batch in BATCHES:
        rows.append(("PyTorch eager", batch, model_ms_per_image(torch_predictor, images, batch, args.repeats)))
        rows.append(("ONNX Runtime", batch, model_ms_per_image(onnx_model, images, batch, args.repeats)))
    rows += log_rows(torch_predictor, files, args.repeats)
    if not args.skip_rest:
        os.environ.setdefault("MLFLOW_TRACKING_URI", paths.absolute_sqlite_url(params.tracking.uri, params.root))
        with tempfile.TemporaryDirectory() as tmp:
            for name, log in (("REST, log off", "off"), ("REST + log", f"sqlite:///{tmp}/predictions.db")):
                os.environ["ADPS_REVIEW_DIR"] = str(Path(tmp) / "review")
                server = serve(args.category, args.threads, port := free_port(), log)
                try:
                    for batch in BATCHES:
                        rows.append((name, batch, rest_ms_per_image(port, files, batch, args.repeats)))
                finally:
                    os.killpg(server.pid, signal.SIGKILL)
    geometry = torch_predictor.geometry
    shown = f"{len(files)} test images, input {geometry.size} ({geometry.resolution}), {args.threads} threads"
    print(f"{args.category}, {shown}\n")
    print("| runtime | batch | ms/image | images/s |\n|---|---|---|---|")
    for name, batch, ms in rows:
        print(f"| {name} | {batch} | {ms:.1f} | {1000 / ms:.1f} |")
    if not args.skip_rss:
        print("\n| adps predict on | peak RSS (MB) |\n|---|---|")
        for count in (200, 2000):
            print(f"| {count} images | {predict_peak_rss_mb(folder, files, count, args.threads):.0f} |")


if __name__ == "__main__":
    main()
