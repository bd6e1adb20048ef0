"""The production loop, offline, on the embedded dataset: serve, drift, monitor, review, retrain, compare.

Run after ``make run`` and ``make up`` (Prefect server, MLflow UI and the deployments being served):

    python -m scripts.production_demo --category washer

1. serves the category's champion (``mlflow models serve``; every prediction goes to the project's log);
2. streams windows of images from the line over REST: a normal line (2 % defects of the known kinds),
   then the lighting drops, then a new defect kind appears (paint drops);
3. runs the deployment ``adps-monitor/watch`` once per window, so each window is a monitor run in the
   Prefect UI (artifacts) and an MLflow run (experiment ``<tracking.experiment>-monitor``); drift raises the
   event whose automation starts ``adps-pipeline/nightly`` early;
4. gives the verdicts a person would (the demo knows the truth): flagged defects ``adps review defect``,
   false alarms ``adps review good``;
5. runs the nightly deployment: the reviewed images are imported, the category retrained and the
   challenger registered, compared with the champion on the challenger's test split.

Writes ``reports/demo/production.md`` (the table of windows, the review, the new version's page) and,
with ``--screenshots DIR``, headless-chromium screenshots of the Prefect and MLflow pages.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from adps.config import load_params, params_path_or_project
from adps.data.embedded import blob, generate_image, image_rng
from adps.files import finite_json
from adps.production.log import log_settings, utc_now
from adps.production.review import ReviewQueue

PHASES = (  # (name, windows, what the line does)
    ("normal line", 8, "2 % defects of the known kinds"),
    ("lighting drops", 2, "brightness x 0.75"),
    ("new defect kind", 2, "paint drops on 25 % of the parts"),
)
WINDOW, PER_REQUEST = 40, 8


@dataclass
class Window:
    phase: str
    index: int
    start: str = ""
    end: str = ""
    truth: dict[str, bool] = field(default_factory=dict)  # input sha256 -> is a defect
    flagged: int = 0
    answered: int = 0


def line_image(category: str, cfg, index: int, phase: str, rng_seed: int) -> tuple[bytes, bool]:
    """One PNG from the line in ``phase`` and whether it holds a defect."""
    rng = image_rng(rng_seed, category, "line", phase, index)
    kind = cfg.defect_kinds[index % len(cfg.defect_kinds)] if rng.random() < 0.02 else None
    image, _ = generate_image(category, cfg, rng, kind)
    defect = kind is not None
    if phase == "lighting drops":
        image = (image.astype(np.float32) * 0.75).astype(np.uint8)
    if phase == "new defect kind" and rng.random() < 0.25:
        size = image.shape[0]
        center = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
        drop = blob(size, center, float(rng.uniform(4, 8)), rng)[..., None].astype(np.float32)
        image = (image * (1 - drop) + np.array([230, 120, 20]) * drop).astype(np.uint8)
        defect = True
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue(), defect


def post(url: str, images: list[bytes]) -> list[dict]:
    body = json.dumps({"instances": [base64.b64encode(i).decode() for i in images]}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)["predictions"]


def serve(category: str, port: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    command = ["mlflow", "models", "serve", "-m", f"models:/adps-{category}@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the model server stopped: see {log}") from None
            time.sleep(1)
    raise SystemExit(f"the model server did not answer: see {log}")


def stream(category: str, cfg, url: str, seed: int) -> list[Window]:
    import hashlib

    windows, counter = [], 0
    for phase, n_windows, _ in PHASES:
        for _ in range(n_windows):
            window = Window(phase, len(windows) + 1, start=utc_now().isoformat())
            for _ in range(0, WINDOW, PER_REQUEST):
                batch = [line_image(category, cfg, counter + i, phase, seed) for i in range(PER_REQUEST)]
                counter += PER_REQUEST
                answers = post(url, [image for image, _ in batch])
                for (image, defect), answer in zip(batch, answers, strict=True):
                    window.truth[hashlib.sha256(image).hexdigest()] = defect
                    window.answered += answer["error"] == ""
                    window.flagged += bool(answer["is_anomalous"])
            time.sleep(1.0)
            window.end = utc_now().isoformat()
            windows.append(window)
            print(f"window {window.index} ({phase}): {window.flagged} of {window.answered} flagged", flush=True)
    return windows


def run(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def monitor_windows(windows: list[Window], env: dict[str, str]) -> None:
    from datetime import datetime

    for window in windows:
        start, end = datetime.fromisoformat(window.start), datetime.fromisoformat(window.end)
        hours = (end - start + timedelta(seconds=0.5)).total_seconds() / 3600
        run(["prefect", "deployment", "run", "adps-monitor/watch", "-p", f"hours={hours}", "-p",
             f"until={end.isoformat()}", "--watch"], env)  # fmt: skip
        print(f"monitored window {window.index}", flush=True)


def monitor_rows(params, category: str, windows: list[Window]) -> list[dict]:
    """Each window's monitor run, read back from MLflow (what a person charts in the UI)."""
    import mlflow

    from adps.tracking import connect
    from adps.tracking.monitoring import MONITOR_EXPERIMENT_SUFFIX

    connect(params, create=False)
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment + MONITOR_EXPERIMENT_SUFFIX],
                              filter_string=f"tags.category = '{category}'", output_format="list")  # fmt: skip
    by_end = {r.data.tags["window_end"]: r for r in runs}
    rows = []
    for window in windows:
        found = by_end.get(window.end)
        metrics = found.data.metrics if found else {}
        rows.append({
            "window": window.index, "phase": window.phase, "images": window.answered,
            "defects (truth)": sum(window.truth.values()), "flagged": window.flagged,
            "score p": metrics.get("score_p_value"), "flag-rate p": metrics.get("flag_rate_p_value"),
            "input p": metrics.get("input_p_value"), "features p": metrics.get("features_p_value"),
            "status": found.data.tags["status"] if found else "no monitor run",
        })  # fmt: skip
    return rows


def review(params, category: str, windows: list[Window], env: dict[str, str]) -> dict[str, int]:
    """The verdicts a person would give, from the truth the demo knows."""
    truth = {sha: defect for w in windows for sha, defect in w.truth.items()}
    queue = ReviewQueue(log_settings(params).review_dir)  # where the served model kept them
    counts = {"defect": 0, "good": 0, "unknown": 0}
    for item in queue.items(category):
        defect = truth.get(item["input_sha256"])
        if defect is None:
            counts["unknown"] += 1
            continue
        verdict = "defect" if defect else "good"
        run(["adps", "review", verdict, item["id"]], env)
        counts[verdict] += 1
    return counts


def prefect_api(root: Path) -> str:
    """The API URL `make up` wrote into the project's prefect.toml (or PREFECT_API_URL)."""
    import tomllib

    toml = root / "prefect.toml"
    return os.environ.get("PREFECT_API_URL") or tomllib.loads(toml.read_text())["api"]["url"]


def pipeline_runs_going(api: str) -> int:
    body = {"flows": {"name": {"any_": ["adps-pipeline"]}},
            "flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}}  # fmt: skip
    request = urllib.request.Request(f"{api}/flow_runs/filter", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.load(response))


def nightly(api: str, env: dict[str, str]) -> str:
    """The nightly deployment, once the early runs the drift automation started have finished."""
    time.sleep(10)  # the automation's runs start a few seconds after the event
    while pipeline_runs_going(api):
        time.sleep(5)
    return run(["prefect", "deployment", "run", "adps-pipeline/nightly", "--watch"], env)


def latest_version_page(params, category: str) -> tuple[str, dict]:
    from adps.tracking import connect

    client = connect(params, create=False)
    versions = client.search_model_versions(f"name='adps-{category}'")
    latest = client.get_model_version(f"adps-{category}", str(max(int(v.version) for v in versions)))
    return latest.description or "", {"version": latest.version, **latest.tags, "aliases": latest.aliases}


def markdown_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.2g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "\n".join("| " + " | ".join(cell(v) for v in r.values()) + " |" for r in rows) + "\n"


def latest_artifact(key: str, api: str = "http://127.0.0.1:4200/api") -> str:
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    request = urllib.request.Request(f"{api}/artifacts/filter", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)[0]["id"]


def screenshots(folder: Path, category: str, params) -> None:
    """Headless chromium pictures of the pages a person looks at (Prefect and MLflow UIs of ``make up``)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: screenshots skipped")
        return
    folder.mkdir(parents=True, exist_ok=True)
    import mlflow

    from adps.tracking import connect

    client = connect(params, create=False)
    monitor = mlflow.get_experiment_by_name(params.tracking.experiment + "-monitor")
    version = max(int(v.version) for v in client.search_model_versions(f"name='adps-{category}'"))
    pages = {
        "prefect-runs.png": "http://127.0.0.1:4200/runs",
        "prefect-drift-table.png": f"http://127.0.0.1:4200/artifacts/artifact/{latest_artifact('adps-drift-report')}",
        "prefect-automations.png": "http://127.0.0.1:4200/automations",
        "mlflow-monitor-charts.png": f"http://127.0.0.1:5000/#/experiments/{monitor.experiment_id}/runs?compareRunsMode=CHART",
        "mlflow-version.png": f"http://127.0.0.1:5000/#/models/adps-{category}/versions/{version}",
    }
    for name, url in pages.items():
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1500,1000", "--virtual-time-budget=15000", f"--screenshot={folder / name}",
                        url], capture_output=True, timeout=120)  # fmt: skip
        print(f"screenshot {folder / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="washer")
    parser.add_argument("--params", default=None)
    parser.add_argument("--port", type=int, default=5001, help="port of the served model")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the line's images")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for screenshots (needs chromium)")
    args = parser.parse_args()
    params = load_params(params_path_or_project(args.params))
    os.chdir(params.root)
    env = dict(os.environ)
    out = params.root / "reports" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    server = serve(args.category, args.port, out / "serve.log", env)
    try:
        windows = stream(args.category, params.synthetic, f"http://127.0.0.1:{args.port}/invocations", args.seed)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    monitor_windows(windows, env)
    rows = monitor_rows(params, args.category, windows)
    verdicts = review(params, args.category, windows, env)
    print(f"verdicts: {verdicts}", flush=True)
    print(nightly(prefect_api(params.root), env)[-2000:], flush=True)
    page, version = latest_version_page(params, args.category)
    report = (
        f"# Production demo: {args.category}\n\n{markdown_table(rows)}\n"
        f"Verdicts: {verdicts['defect']} defect, {verdicts['good']} good "
        f"({verdicts['unknown']} kept inputs not from this stream left alone).\n\n"
        f"## Version {version['version']} (aliases {', '.join(version['aliases']) or 'none'})\n\n{page}\n"
    )
    (out / "production.md").write_text(report)
    summary = finite_json({"windows": rows, "verdicts": verdicts, "version": version})  # a p-value may be NaN
    (out / "production.json").write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
    print(report)
    if args.screenshots:
        screenshots(args.screenshots, args.category, params)


if __name__ == "__main__":
    main()
