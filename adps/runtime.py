"""Process-wide runtime settings: logging, progress bars, seeding."""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from adps.config import Params


def configure_logging(params: Params) -> None:
    """Log to stderr at ``runtime.log_level``, once per process."""
    logging.basicConfig(
        level=params.runtime.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def progress_enabled(params: Params) -> bool:
    """Progress bars only when asked for and stderr is a terminal."""
    return params.runtime.progress and sys.stderr.isatty()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch from ``runtime.seed``."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(params: Params):
    """``runtime.device``: auto -> CUDA when present, else CPU."""
    import torch

    if params.runtime.device == "cuda" or (params.runtime.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def setup_torch(params: Params):
    """Seed everything, apply ``runtime.threads``, and return the device to run on."""
    import torch

    seed_everything(params.runtime.seed)
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    return resolve_device(params)


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
