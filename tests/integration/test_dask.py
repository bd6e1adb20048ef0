"""The flow on a real Dask cluster: two worker processes started here, two categories, run from another folder.

Its outputs must equal a ``dvc repro`` of the same params in another project, and leave ``dvc status``
clean: the stages write where their params' project root says, whatever process or folder runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
from distributed import Client
from prefect.testing.utilities import prefect_test_harness

from adps.config import load_params
from adps.errors import AdpsError
from flows.cluster import check_workers_see_project, local_cluster
from flows.pipeline import adps_pipeline
from tests.conftest import make_dvc_project, output_digests, project_env, run

CATEGORIES = ["fabric", "washer"]
# Two Dask workers share the cores (on 2 CPUs: one torch thread each); one thread for dvc repro too,
# so both front-ends sum floats in the same order and give the same bits.
PARAMS = {"data": {"categories": CATEGORIES, "image_size": 64}, "runtime": {"threads": 1}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    before = dict(os.environ)
    with local_cluster(2) as local:
        assert dict(os.environ) == before  # the nanny's OMP_NUM_THREADS=1 must not stay in this process
        yield local


@pytest.fixture(scope="module")
def dask_project(tmp_path_factory, cluster):
    """A project whose flow ran on the two-process cluster, started from an unrelated working directory."""
    root = tmp_path_factory.mktemp("daskproj")
    env = project_env(root)
    runtime = {**PARAMS["runtime"], "task_runner": "dask", "dask_address": cluster.scheduler_address}
    make_dvc_project(root, env, **{**PARAMS, "runtime": runtime})
    params_file = root / "params.yaml"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        mp.setenv("PATH", env["PATH"])
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        rows = adps_pipeline(params_path=str(params_file))
    assert not any(elsewhere.iterdir()), "the flow wrote into the working directory"
    return root, env, rows


def test_flow_on_two_dask_worker_processes_equals_dvc_repro(dask_project, tmp_path):
    root, env, rows = dask_project
    assert {r["category"]: r["status"] for r in rows} == dict.fromkeys(CATEGORIES, "retrained")
    other = tmp_path / "repro"
    other.mkdir()
    other_env = project_env(other)
    make_dvc_project(other, other_env, **PARAMS)
    run(["dvc", "repro"], other, other_env)
    for category in CATEGORIES:
        assert output_digests(root, category) == output_digests(other, category), category
        metrics = json.loads((root / f"reports/metrics/{category}.json").read_text())
        assert metrics == json.loads((other / f"reports/metrics/{category}.json").read_text())
    assert "up to date" in run(["dvc", "status"], root, env)


def test_the_stages_ran_in_the_worker_processes(dask_project, cluster):
    """The workers, not the flow's process, imported the training code."""
    with Client(cluster) as client:
        loaded = client.run(lambda: "adps.stages" in __import__("sys").modules)
    assert len(loaded) == 2 and any(loaded.values())


def test_a_worker_that_does_not_see_the_project_is_named(dask_project, cluster, tmp_path):
    """A worker "on another host": its own mount namespace shows an empty folder at the project's path."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root, or user namespaces) to give a worker its own view of the filesystem")
    root, env, _ = dask_project
    mount_and_work = f"mount -t tmpfs none {root} && exec dask worker {cluster.scheduler_address} --nthreads 1"
    log = (tmp_path / "worker.log").open("w")
    blind = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", mount_and_work],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=120)
            (blind_address,) = set(client.scheduler_info()["workers"]) - {
                w.worker_address for w in cluster.workers.values()
            }
        with pytest.raises(AdpsError, match="do not see this project") as err:
            check_workers_see_project(cluster.scheduler_address, load_params(root / "params.yaml"))
        assert blind_address in str(err.value)
        assert all(w.worker_address not in str(err.value) for w in cluster.workers.values())
    finally:
        os.killpg(blind.pid, signal.SIGKILL)
        blind.wait()


def test_a_cluster_without_workers_is_refused_before_anything_runs(dask_project):
    root, _, _ = dask_project
    with local_cluster(0) as empty, pytest.raises(AdpsError, match="has no workers"):
        check_workers_see_project(empty.scheduler_address, load_params(root / "params.yaml"))


def test_local_workers_share_the_cores_and_leave_this_process_as_it_was(monkeypatch):
    """``runtime.threads: 0`` on a LocalCluster: the CPUs (here OMP_NUM_THREADS=4) divided among the workers.

    And no ``MALLOC_TRIM_THRESHOLD_`` from the nanny: it made training steps 2-2.7x slower.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    for workers, each in ((1, "4"), (2, "2")):
        with local_cluster(workers) as local, Client(local) as client:
            seen = client.run(lambda: (os.environ["OMP_NUM_THREADS"], os.environ.get("MALLOC_TRIM_THRESHOLD_")))
        assert set(seen.values()) == {(each, None)}
        assert os.environ["OMP_NUM_THREADS"] == "4" and "MALLOC_TRIM_THRESHOLD_" not in os.environ
