"""Process-wide runtime settings: progress bars, seeding, threads and device."""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from adps.config import Params
from adps.errors import AdpsError

logger = logging.getLogger(__name__)

# What each ``runtime.cpu_kernels`` setting asks of the three libraries whose CPU kernels torch runs: ATen's
# own vectorised kernels, oneDNN (convolutions) and MKL (matrix products). Each reads its variable once, at
# its first use in the process, so they are set before any tensor is computed.
CPU_KERNEL_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "native": {},
}
PINNED_CAPABILITY = {"avx2": "AVX2"}  # what ATen reports when the pin holds


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


def pin_cpu_kernels(kernels: str) -> str:
    """Ask torch's CPU kernels for the instruction set of ``runtime.cpu_kernels``; returns the one ATen uses.

    Kernels written for AVX-512 or AMX add floats in another order than AVX2 ones, so the same training
    gives other low bits, and after many steps other weights and metrics, on another CPU. With ``avx2``
    every x86-64 machine with AVX2 runs the same kernels. The libraries read the setting once per process:
    when something computed with torch before this call, the kernels are already chosen, and a warning says so.
    """
    import torch

    os.environ.update(CPU_KERNEL_ENV[kernels])
    capability = torch.backends.cpu.get_cpu_capability()
    wanted = PINNED_CAPABILITY.get(kernels, capability)
    if capability == "DEFAULT" and wanted != capability:
        logger.warning("runtime.cpu_kernels: %s, but this CPU has no AVX2: results differ in the low bits", kernels)
    elif capability != wanted:
        logger.warning(
            "runtime.cpu_kernels: %s, but this process already runs %s kernels (torch computed before the "
            "setting could apply): results may differ in the low bits from other machines; run in a new process",
            kernels,
            capability,
        )
    return capability


def setup_torch(params: Params):
    """Pin the CPU kernels, seed everything, ask for deterministic algorithms, apply ``runtime.threads``; return
    the device.

    On CPU, the same params, data and thread count give bit-identical weights, on any x86-64 machine with
    AVX2 while ``runtime.cpu_kernels`` is ``avx2``; another thread count changes the order of float
    reductions and so the low bits (docs/results.md measures how much).
    """
    import torch

    pin_cpu_kernels(params.runtime.cpu_kernels)
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
