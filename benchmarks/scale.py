"""Scale-out wall times (README, "Scaling out"), one run each, in a project after `make run`.

    python benchmarks/scale.py flow --workers 1 2                      # forced flow on a LocalCluster of N processes
    python benchmarks/scale.py tune -c fabric --trials 20 --workers 1 2 # a fresh PostgreSQL study per N workers

``flow`` reruns every stage of every category (``force=True``) with ``runtime.task_runner: dask`` and
``max_workers: N`` (params written to ``params.scale.yaml`` beside params.yaml, removed afterwards;
the keys it changes are not DVC params, so dvc.lock stays consistent). ``tune`` starts PostgreSQL
from pip (pgserver) in a temp folder and runs a new study per N. Run nothing else meanwhile: two
cores are easily shared by accident.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from adps.config import load_params, set_dotted
from adps.files import write_text_atomically


def scaled_params(params_path: Path, overrides: dict) -> Path:
    """A copy of the params file with ``{"section.key": value}`` overrides, in the same folder (the same root)."""
    raw = yaml.safe_load(params_path.read_text())
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    target = params_path.with_name("params.scale.yaml")
    write_text_atomically(target, yaml.safe_dump(raw, sort_keys=False))
    return target


def time_flow(params_path: Path, workers: int) -> float:
    from flows.pipeline import adps_pipeline

    variant = scaled_params(
        params_path, {"runtime.task_runner": "dask", "runtime.dask_address": None, "runtime.max_workers": workers}
    )
    try:
        started = time.perf_counter()
        adps_pipeline(params_path=str(variant), force=True)
        return time.perf_counter() - started
    finally:
        variant.unlink(missing_ok=True)


def time_study(params_path: Path, category: str, trials: int, workers: int, storage: str) -> float:
    from adps import tuning

    study = f"scale-{workers}w-{uuid.uuid4().hex[:6]}"
    variant = scaled_params(params_path, {"tune.storage": storage, "tune.study_name": study})
    try:
        params = load_params(variant)
        started = time.perf_counter()
        tuning.tune(params, category, trials, workers)
        return time.perf_counter() - started
    finally:
        variant.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["flow", "tune"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("-c", "--category", default="fabric")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    params_path = args.params.resolve()
    rows = []
    if args.what == "flow":
        rows = [(n, time_flow(params_path, n)) for n in args.workers]
    else:
        import pgserver

        with tempfile.TemporaryDirectory(prefix="adps-pg-") as folder:
            server = pgserver.get_server(folder, cleanup_mode="stop")
            try:
                rows = [
                    (n, time_study(params_path, args.category, args.trials, n, server.get_uri())) for n in args.workers
                ]
            finally:
                server.cleanup()
    print(f"\n| {args.what} | workers | wall time |\n|---|---|---|")
    for workers, seconds in rows:
        print(f"| {args.what} | {workers} | {seconds / 60:.1f} min ({seconds:.0f} s) |")


if __name__ == "__main__":
    main()
