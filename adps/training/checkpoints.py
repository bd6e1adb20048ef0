"""Checkpoints: weights + the model's params + versions + teacher weights used.

Saved atomically, loaded with ``torch.load(weights_only=True)``. A checkpoint alone rebuilds the
model (no params.yaml needed): it carries the model and preprocessing params.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from pathlib import Path
from typing import Any

import torch
import torchvision

import adps
from adps.config import Params, ScoreParams
from adps.data.datasets import Normalizer
from adps.data.images import InputGeometry
from adps.errors import AdpsError
from adps.files import write_atomically
from adps.model.backbones import input_normalization
from adps.model.network import ADPS, COMBINED, AdpsModel

FORMAT_VERSION = 1


class CheckpointError(AdpsError):
    """A checkpoint that is missing, unreadable or of another format."""


def normalization(params: Params) -> tuple[list[float], list[float]]:
    """(mean, std) of the model input: the backbone weights' own unless ``data.normalize_*`` override them."""
    return input_normalization(params.model.backbone, params.data.normalize_mean, params.data.normalize_std)


def input_normalizer(params: Params) -> Normalizer:
    return Normalizer(*normalization(params))


def input_geometry(spec: dict[str, Any]) -> InputGeometry:
    """How images become this model's input (a checkpoint from before ``data.resolution`` resized them)."""
    return InputGeometry(spec["image_size"], spec.get("resolution", "resize"), spec.get("scale", 1.0))


def params_geometry(params: Params) -> InputGeometry:
    """How images become the input of the model the params describe (``data.image_size``, ``resolution``, ``scale``)."""
    return input_geometry(model_spec(params))


def model_spec(params: Params) -> dict[str, Any]:
    """Everything needed to rebuild the model and preprocess its input, as plain JSON-able data."""
    mean, std = normalization(params)
    return {
        "model": params.model.model_dump(mode="json"),
        "image_size": params.data.image_size,
        "resolution": params.data.resolution,
        "scale": params.data.scale,
        "normalize_mean": mean,
        "normalize_std": std,
    }


def fingerprint(payload: Any) -> str:
    """Short stable hash of JSON-able data (to tell whether a resume file matches the params)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_model(spec: dict[str, Any]) -> AdpsModel:
    """The model of a spec, scoring with the ``score`` defaults until told otherwise (``set_scoring``).

    ``model.kind: auto`` builds the combination, which holds every kind (evaluate chooses among them).
    A checkpoint from before model kinds (no ``kind``) is an ADPS model.
    """
    m = spec["model"]
    bank = m.get("memory_bank", {})
    return AdpsModel(
        backbone=m["backbone"],
        patches=m["patches"],
        split_after=tuple(m["split_after"]),
        psm_head_channels=tuple(m["psm_head_channels"]),
        scoring=ScoreParams().model_dump(),
        kind=built_kind(m.get("kind", ADPS)),
        bank_levels=tuple(bank.get("levels", (1, 2))),
        bank_neighbourhood=bank.get("neighbourhood", 3),
        input_size=spec["image_size"],
    )


def built_kind(kind: str) -> str:
    """The kind of model ``model.kind`` builds: ``auto`` builds the combination (it can answer as any kind)."""
    return COMBINED if kind == "auto" else kind


def versions() -> dict[str, str]:
    import timm

    return {
        "adps": adps.__version__,
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # runtime.cpu_kernels as it held in this process
    }


def save_checkpoint(path: Path, model: AdpsModel, spec: dict[str, Any], **extra: Any) -> Path:
    """Write weights, spec, versions and ``extra`` (phase, epoch, optimizer state...) atomically."""
    payload = {"format": FORMAT_VERSION, "spec": spec, "versions": versions(), "state": model.state_dict(), **extra}
    buffer = io.BytesIO()  # saved through a buffer: the archive is named "archive", not after the temp file,
    torch.save(payload, buffer)  # so equal contents give byte-identical files (and equal DVC hashes)
    return write_atomically(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``)."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Run the stage that writes it first.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}. Delete it and rerun the stage.") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an ADPS checkpoint of format {FORMAT_VERSION}")
    return payload


def load_model(path: Path) -> tuple[AdpsModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone; returns (model in eval mode, checkpoint dict)."""
    payload = read_checkpoint(path)
    missing = [key for key in ("spec", "state", "phase") if key not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is damaged; rerun the stage that writes it.")
    model = build_model(payload["spec"])
    try:
        model.load_state_dict(payload["state"])
    except RuntimeError as err:
        first = str(err).splitlines()[:3]
        raise CheckpointError(
            f"{path} does not fit its own model spec ({' '.join(first)}): "
            "it is damaged; rerun the stage that writes it."
        ) from err
    return model.eval(), payload
