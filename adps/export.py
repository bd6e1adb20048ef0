"""ONNX export of a deployable model, and an ONNX Runtime predictor with the PyTorch one's interface.

The graph holds the shipped kind's whole inference path: teacher, patch student with stitching, WMB,
PSM and/or the memory bank's nearest-neighbour search, Gaussian smoothing and the image score.
Input ``image``: (batch, 3, H, W) float32 of any height and width, already normalised and sized (see the
metadata: resized to S x S, or at native resolution). Outputs ``anomaly_map``: (batch, 1, H, W) float32
in [0, 1], ``image_score``: (batch,). Metadata (``onnx`` ``metadata_props``) holds what a runtime without
this project needs: input size and resolution rule, normalisation, thresholds, score settings, category
and the sha256 of the source checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adps.data.images import InputGeometry
from adps.errors import AdpsError
from adps.files import file_sha256, write_atomically
from adps.inference import Predictor, TorchEngine, read_thresholds
from adps.paths import ONNX_FILE, PSM_FILE, THRESHOLDS_FILE

logger = logging.getLogger(__name__)
OPSET = 18
INPUT_NAME, OUTPUT_NAMES = "image", ("anomaly_map", "image_score")


class MapsAndScores(torch.nn.Module):
    """The ADPS model with tensor outputs only (ONNX graphs return tensors, not dataclasses)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image)
        return out.anomaly_map, out.image_score


def onnx_metadata(engine: TorchEngine, thresholds: dict[str, Any], folder: Path) -> dict[str, str]:
    return {
        "format": "adps-onnx-1",
        "image_size": str(engine.geometry.size),
        "resolution": engine.geometry.resolution,
        "scale": str(engine.geometry.scale),
        "normalize_mean": json.dumps(engine.normalize.mean.flatten().tolist()),
        "normalize_std": json.dumps(engine.normalize.std.flatten().tolist()),
        "preprocessing": (
            "RGB; resolution resize: bilinear resize to image_size x image_size; native: the image's own size "
            "times scale (bilinear); auto: native when a side exceeds image_size, else resize; x/255, "
            "(x - mean) / std, NCHW float32"
        ),
        "image_threshold": str(thresholds["image"]),
        "pixel_threshold": str(thresholds["pixel"]),
        "score": json.dumps(thresholds["score"]),
        "category": str(thresholds.get("category", "")),
        "checkpoint_sha256": file_sha256(folder / PSM_FILE),
        "outputs": "anomaly_map (batch,1,H,W) in [0,1]; image_score (batch,): anomalous when >= image_threshold",
    }


def export_onnx(folder: Path, target: Path) -> dict[str, Any]:
    """Export the model folder (psm.pt + thresholds.json) to ``target`` with dynamic batch, height and width."""
    import onnx

    predictor = Predictor.from_dir(folder, "cpu")
    engine = predictor.engine
    wrapped = MapsAndScores(engine.model).eval()
    size = engine.geometry.size
    example = torch.zeros(2, 3, size + 8, size + 24)  # not whole patches: the padding is traced
    buffer = io.BytesIO()
    # The TorchScript exporter: 0.7 s here against 14 s for dynamo=True, with the same maps (measured
    # on Lite0 at 128 px: max difference 6e-8 to PyTorch either way).
    with warnings.catch_warnings():  # one export per process at a time: see stages.alone_in_process
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAMES[0]: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in onnx_metadata(engine, predictor.thresholds, folder).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    write_atomically(target, lambda tmp: onnx.save(proto, str(tmp)))
    return {"onnx": str(target), "opset": OPSET, "bytes": target.stat().st_size}


class OnnxEngine:
    """The forward pass in ONNX Runtime (no PyTorch model is built); size and normalisation from the metadata."""

    def __init__(self, onnx_path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            self.metadata = self.session.get_modelmeta().custom_metadata_map
            self.geometry = InputGeometry(
                int(self.metadata["image_size"]),
                self.metadata.get("resolution", "resize"),
                float(self.metadata.get("scale", 1.0)),
            )
            mean, std = json.loads(self.metadata["normalize_mean"]), json.loads(self.metadata["normalize_std"])
        except Exception as err:  # onnxruntime raises its own types; any of them means the same here
            raise AdpsError(
                f"{onnx_path} is not a model.onnx written by `adps export` ({type(err).__name__}: {err}): "
                "run `adps export` again."
            ) from err
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def to(self, device: str) -> None:
        if device not in ("auto", "cpu"):
            raise AdpsError("--engine onnx runs on the CPU here: use --device auto or cpu")

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, None]:
        """Maps and scores; no teacher features (the exported graph answers maps and scores only)."""
        batch = ((np.stack(images) - self.mean) / self.std).transpose(0, 3, 1, 2).astype(np.float32)
        anomaly_map, score = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return anomaly_map[:, 0], score, None


def onnx_predictor(model_dir: Path, threads: int = 0) -> Predictor:
    """A :class:`Predictor` of a model folder's model.onnx (or of the folder of a given model.onnx or psm.pt).

    model.onnx must be the export of exactly this folder's model: the psm.pt and the thresholds and
    scoring of thresholds.json it was exported with (recorded in its metadata). Anything else is
    refused, since the graph scores as it was exported, whatever thresholds.json says now.
    """
    model_dir = Path(model_dir)
    folder = model_dir.parent if model_dir.suffix in (".onnx", ".pt") else model_dir
    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        raise AdpsError(f"no model.onnx in {folder}: run `adps export -c <category>` first.")
    thresholds = read_thresholds(folder / THRESHOLDS_FILE)
    engine = OnnxEngine(onnx_path, threads)
    if stale := export_mismatch(engine.metadata, thresholds, folder):
        raise AdpsError(f"{onnx_path} was not exported from this folder's model ({stale}): run `adps export` again.")
    return Predictor(engine, thresholds)


def export_mismatch(metadata: dict[str, str], thresholds: dict[str, Any], folder: Path) -> str:
    """What differs between model.onnx's metadata and the folder's psm.pt and thresholds.json ('' when none)."""
    exported = metadata.get("checkpoint_sha256")
    if (folder / PSM_FILE).is_file() and exported != file_sha256(folder / PSM_FILE):
        return "its psm.pt differs"
    if exported != thresholds["checkpoint_sha256"]:
        return "thresholds.json was chosen for another psm.pt"
    recorded = {
        "image_threshold": str(thresholds["image"]),
        "pixel_threshold": str(thresholds["pixel"]),
        "score": json.dumps(thresholds["score"]),
    }
    differ = [key for key, value in recorded.items() if metadata.get(key) != value]
    return f"thresholds.json has another {', '.join(differ)}" if differ else ""
