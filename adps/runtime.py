"""Process-wide runtime settings: progress bars, seeding, threads and device."""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from adps.config import Params
from adps.errors import AdpsError


def progress_enabled(params: Params) -> bool:
    """Progress bars only when asked for and stderr is a terminal."""
    return params.runtime.progress and sys.stderr.isatty()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch from ``runtime.seed``."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str):
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``; a clear error for anything else or a missing GPU.

    The one reading of a device name, for training (``runtime.device``) and prediction (``--device``).
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise AdpsError(f"unknown device '{device}': use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise AdpsError("device cuda, but this machine has no usable CUDA GPU: use auto or cpu")
    return torch.device(device)


def default_threads() -> int:
    """What ``runtime.threads: 0`` means: ``OMP_NUM_THREADS`` when set, else the CPUs this process may use.

    Set explicitly every time, so an earlier caller in the same process cannot change the result.
    """
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def shared_threads(processes: int) -> int:
    """Each process's share of :func:`default_threads` when ``processes`` train at once on this machine.

    Two processes each taking both of 2 cores run 4 busy OpenMP threads and are several times slower
    than with one each.
    """
    return max(1, default_threads() // max(processes, 1))


def setup_torch(params: Params):
    """Seed everything, ask for deterministic algorithms, apply ``runtime.threads``; return the device.

    On CPU, the same params, data and thread count give bit-identical weights; another thread count
    changes the order of float reductions and so the low bits (docs/results.md measures how much).
    """
    import torch

    seed_everything(params.runtime.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA kernels without a deterministic form warn
    torch.set_num_threads(params.runtime.threads or default_threads())
    return resolve_device(params.runtime.device)


_INIT_LOCK = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (model construction) under ``seed`` without touching the global RNG of other threads.

    Categories may train in parallel threads (Prefect's thread runner); this keeps each model's random
    initialisation identical to a ``dvc repro`` run with the same params.
    """
    import torch

    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
