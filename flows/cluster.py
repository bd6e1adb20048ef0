"""Where the categories' chains run: threads in the flow's process, or the worker processes of a Dask cluster.

``runtime.task_runner: dask`` with ``runtime.dask_address: null`` starts a ``distributed.LocalCluster``
of ``runtime.max_workers`` worker processes (one stage at a time per worker, the cores shared among them)
for the run; an address connects to an existing scheduler. Stages find their files through the
project root in their params, so every worker must see the project at the same path: checked at
start-up, before anything runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from prefect.task_runners import ThreadPoolTaskRunner

from adps import paths
from adps.config import Params
from adps.errors import AdpsError
from adps.files import write_text_atomically
from adps.runtime import shared_threads


@contextlib.contextmanager
def category_runner(params: Params) -> Iterator[object]:
    """The Prefect task runner for the categories (and the cluster it starts, closed afterwards)."""
    runtime = params.runtime
    if runtime.task_runner != "dask":
        yield ThreadPoolTaskRunner(max_workers=runtime.max_workers)
        return
    from prefect_dask import DaskTaskRunner

    with contextlib.ExitStack() as stack:
        address = runtime.dask_address or stack.enter_context(local_cluster(runtime.max_workers)).scheduler_address
        check_workers_see_project(address, params)
        yield DaskTaskRunner(address=address)


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator[object]:
    """A LocalCluster of ``workers`` processes with one Dask thread each, sharing this machine's cores.

    Torch threads per worker (what ``runtime.threads: 0`` means there): the CPUs divided among the
    workers, handed over as ``OMP_NUM_THREADS`` (Dask's nanny would give each worker 1, leaving cores
    idle with fewer workers than cores). The nanny's ``MALLOC_TRIM_THRESHOLD_`` is dropped: it turns
    off glibc's adaptive mmap threshold, and every training step then maps and faults in its tensors
    afresh (2-2.7x slower distillation steps here). The nanny also exports its settings into this
    process's environment; everything is put back as it was, or every later stage and command
    started from this process would train on its thread count (other bits than ``dvc repro``).
    """
    import dask
    from distributed import LocalCluster

    saved = dict(os.environ)
    try:
        os.environ["OMP_NUM_THREADS"] = str(shared_threads(workers))
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        ):
            restore_environment(saved)
            yield cluster
    finally:
        restore_environment(saved)


def restore_environment(saved: dict[str, str]) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def read_probe(path: str) -> str | None:
    """What a worker reads at the probe's path (None when it does not see the file)."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_workers_see_project(address: str, params: Params) -> None:
    """Fail unless every worker of the cluster reads this project's files at ``root``.

    A fresh random token is written into the project and each worker must read it back: a worker
    on another host without the shared filesystem (or with another copy of the project at the same
    path) is named, and nothing runs.
    """
    from distributed import Client

    probe, token = paths.cluster_probe(params), secrets.token_hex(16)
    write_text_atomically(probe, token)
    with Client(address, timeout=30) as client:
        seen = client.run(read_probe, str(probe))
    if not seen:
        raise AdpsError(f"the Dask cluster at {address} has no workers; start some or set runtime.dask_address: null")
    blind = sorted(worker for worker, value in seen.items() if value != token)
    if blind:
        raise AdpsError(
            f"Dask workers {', '.join(blind)} do not see this project at {params.root}: every worker needs the project "
            "root on a shared filesystem mounted at the same path (and the same environment); see README, Scaling out."
        )
