"""The epoch loop shared by both training phases: Adam, step-down lr, history, resumable state."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from adps.config import PhaseParams
from adps.model.network import AdpsModel
from adps.training.checkpoints import read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

StepFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Phase:
    """One training phase: what to optimise, how one step computes its losses, where to resume from."""

    name: str
    cfg: PhaseParams
    param_groups: list[dict[str, Any]]
    step: StepFn  # batch -> {"loss": total to minimise, and other named losses to log}
    resume_path: Path
    spec: dict[str, Any]
    fingerprint: str  # hash of every param the phase depends on
    seed: int


def make_optimizer(phase: Phase) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam and a step-down schedule (x lr_gamma at each milestone fraction of the epochs)."""
    optimizer = torch.optim.Adam(phase.param_groups, lr=phase.cfg.lr, weight_decay=phase.cfg.weight_decay)
    milestones = sorted({max(1, round(m * phase.cfg.epochs)) for m in phase.cfg.lr_milestones})
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=phase.cfg.lr_gamma)


def restore(phase: Phase, model: AdpsModel, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, list]:
    """Resume from ``phase.resume_path`` when it matches this phase's params; returns (epoch, history)."""
    if not phase.resume_path.is_file():
        return 0, []
    state = read_checkpoint(phase.resume_path)
    if state.get("fingerprint") != phase.fingerprint:
        logger.info("ignoring %s: it was written with other params", phase.resume_path)
        return 0, []
    model.load_state_dict(state["state"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("%s: resuming from epoch %d (%s)", phase.name, state["epoch"], phase.resume_path)
    return state["epoch"], list(state["history"])


def run_epoch(
    phase: Phase, loader: DataLoader, optimizer: torch.optim.Optimizer, progress: bool, epoch: int
) -> dict[str, float]:
    """One pass over the data; returns the mean of each named loss."""
    sums: dict[str, float] = {}
    batches = tqdm(loader, desc=f"{phase.name} epoch {epoch + 1}/{phase.cfg.epochs}", leave=False, disable=not progress)
    for batch in batches:
        losses = phase.step(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
    return {key: value / max(1, len(loader)) for key, value in sums.items()}


EpochHook = Callable[[int, AdpsModel], None]


def fit(
    phase: Phase, model: AdpsModel, dataset: Any, progress: bool = False, on_epoch_end: EpochHook | None = None
) -> list[dict[str, float]]:
    """Train for ``phase.cfg.epochs``, saving a resumable state after every epoch; returns the history.

    ``on_epoch_end(epoch, model)`` runs after each epoch (e.g. validation for a tuning pruner); it may
    raise to stop training.
    """
    optimizer, scheduler = make_optimizer(phase)
    start, history = restore(phase, model, optimizer, scheduler)
    for epoch in range(start, phase.cfg.epochs):
        dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(phase.seed * 10_007 + epoch)
        loader = DataLoader(
            dataset,
            batch_size=phase.cfg.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=len(dataset) > phase.cfg.batch_size,
        )
        started = time.perf_counter()
        losses = run_epoch(phase, loader, optimizer, progress, epoch)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        history.append({"epoch": epoch + 1, **losses, "lr": lr, "seconds": round(time.perf_counter() - started, 3)})
        logger.info(
            "%s epoch %d/%d %s",
            phase.name,
            epoch + 1,
            phase.cfg.epochs,
            " ".join(f"{k}={v:.4f}" for k, v in losses.items()),
        )
        save_checkpoint(
            phase.resume_path,
            model,
            phase.spec,
            epoch=epoch + 1,
            history=history,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            fingerprint=phase.fingerprint,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model)
    return history
