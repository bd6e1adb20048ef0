"""Wall time of the nightly deployment run: nothing changed, new images for one category, forced.

    make run && make up
    python benchmarks/nightly.py --category fabric        # then: make down

Each scenario is one ``prefect deployment run 'adps-pipeline/nightly' --watch`` against the served
deployment (what the schedule triggers), timed from the command's start to its end. Between the
first and second run, ``--good`` normal images and ``--defects`` labelled defects (new synthetic
draws from ``--seed``) are written to ``data/incoming/<category>/``. After each run: the stages
``dvc status`` lists (none expected) and the number of registered versions per category.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from adps import tracking
from adps.config import load_params
from adps.data.embedded import write_new_images

DEPLOYMENT = "adps-pipeline/nightly"


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def nightly_run(*extra: str) -> float:
    """Seconds of one deployment run, watched to its end; a failed run stops the benchmark."""
    start = time.perf_counter()
    out = subprocess.run(
        [tool("prefect"), "deployment", "run", DEPLOYMENT, "--watch", *extra], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0 or "Completed" not in out.stdout + out.stderr:
        sys.exit(f"nightly run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds


def stale_stages() -> str:
    out = subprocess.run([tool("dvc"), "status"], capture_output=True, text=True, check=True).stdout
    stale = [line.rstrip(":") for line in out.splitlines() if line and not line.startswith((" ", "\t"))]
    return ", ".join(s for s in stale if "up to date" not in s) or "none"


def version_counts(params) -> str:
    client = tracking.connect(params)
    counts = {c: len(client.search_model_versions(f"name='{tracking.model_name(c)}'")) for c in params.data.categories}
    return ", ".join(f"{c} {n}" for c, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="fabric", help="the category that receives new images")
    parser.add_argument("--good", type=int, default=5)
    parser.add_argument("--defects", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1, help="seed of the new images (another seed, other images)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    if not os.environ.get("PREFECT_API_URL") and not Path("prefect.toml").is_file():
        sys.exit("no Prefect server configured: run `make up` first (it serves the nightly deployment).")
    params = load_params(args.params)
    rows = []

    def scenario(name: str, *extra: str) -> None:
        seconds = nightly_run(*extra)
        rows.append((name, seconds, stale_stages(), version_counts(params)))
        print(f"{name}: {seconds:.0f} s", flush=True)

    scenario("nothing changed")
    incoming = Path(params.data.import_path) / args.category
    write_new_images(args.category, params.synthetic, incoming, args.good, args.defects, args.seed, f"new{args.seed}_")
    scenario(f"{args.category}: +{args.good} good, +{args.defects} defects")
    scenario("forced (-p force=true)", "-p", "force=true")
    print("\n| nightly run | wall time | stale after (dvc status) | model versions |\n|---|---|---|---|")
    for name, seconds, stale, versions in rows:
        print(f"| {name} | {seconds / 60:.1f} min ({seconds:.0f} s) | {stale} | {versions} |")


if __name__ == "__main__":
    main()
