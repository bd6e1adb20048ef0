"""MLflow pyfunc of a trained ADPS model (models-from-code): weights, thresholds and preprocessing inside.

What a client sends and gets back is stated once, in :mod:`adps.serving_contract`. Column ``path``
(a file on the server) is read only when the server was started with
``ADPS_SERVE_ALLOWED_ROOT=<folder>`` and the file lies under it. A row that cannot be read (bad
base64, not an image, too large, refused path) gets its ``error`` and the other rows are still scored.

The model has no input schema: MLflow would drop unknown columns (and, with every column optional,
hand the model an empty frame); reading the request here keeps every shape's answer or error ours.

Every answered row is recorded in the prediction log (:mod:`adps.production.log`) of the project the
server runs in (its params.yaml, found from the working directory), or of ``ADPS_PREDICTION_LOG``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from adps.errors import AdpsError
from adps.inference import ImagePrediction, ImageSource, Predictor
from adps.production.log import PredictionLog, settings_where_served
from adps.serving_contract import OUTPUT_COLUMNS, RequestShapeError, request_rows

ALLOWED_ROOT_ENV = "ADPS_SERVE_ALLOWED_ROOT"


def allowed_path(value: str, root: Path | None) -> Path:
    """A path a client sent, accepted only when it is a regular file under the server's allowed ``root``.

    Without a root, paths are refused outright. The same message for "missing" and "outside" tells a
    client nothing about which files exist; special files (FIFOs, devices) are refused so they cannot
    hang the server.
    """
    refused = "path not accepted: send the image itself (base64), or a file under the server's allowed root"
    if root is None:
        raise AdpsError("paths are not accepted by this server: send the image itself (base64 in column 'image')")
    try:
        resolved = Path(value).resolve(strict=True)
        inside = resolved.is_relative_to(root.resolve(strict=True))
        regular = stat.S_ISREG(resolved.stat().st_mode)
    except (OSError, RuntimeError, ValueError):
        raise AdpsError(refused) from None
    if not (inside and regular):
        raise AdpsError(refused)
    return resolved


def allowed_root() -> Path | None:
    root = os.environ.get(ALLOWED_ROOT_ENV)
    return Path(root) if root else None


def row_source(index: int, row: dict[str, Any], root: Path | None) -> ImageSource:
    """The image of one input row, or the reason it is refused."""
    image, path = row.get("image"), row.get("path")
    if isinstance(image, str) and image:
        try:
            return ImageSource(f"row {index}", data=base64.b64decode(base64_text(image), validate=True))
        except (binascii.Error, ValueError) as err:
            return ImageSource(f"row {index}", error=f"column 'image' is not valid base64: {err}")
    if isinstance(path, str) and path:
        try:
            return ImageSource(path, path=allowed_path(path, root))
        except AdpsError as err:
            return ImageSource(path, error=str(err))
    return ImageSource(f"row {index}", error="give the image as base64 text in column 'image'")


def base64_text(value: str) -> str:
    """The base64 part of a value, without line breaks (MIME-style output) or a ``data:...;base64,`` prefix."""
    if value.startswith("data:") and ";base64," in value[:200]:
        value = value.split(";base64,", 1)[1]
    return "".join(value.split())


def map_png(anomaly_map: np.ndarray) -> str:
    """An anomaly map in [0, 1] as a 16-bit grayscale PNG, base64-encoded."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(anomaly_map, 0, 1) * 65535).round().astype(np.uint16)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class AdpsPyfunc(mlflow.pyfunc.PythonModel):
    """Loads ``psm.pt`` + ``thresholds.json`` once from the logged ``model_dir`` artifact."""

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor.from_dir(context.artifacts["model_dir"])
        self.root = allowed_root()
        category = self.predictor.thresholds.get("category") or "unknown"
        self.log = PredictionLog(settings_where_served(), "serve", f"adps-{category}")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One output row per image of ``model_input`` (any shape of :func:`request_rows`); HTTP 400 otherwise.

        ``pd.DataFrame`` is the hint MLflow derives no input schema from; lists and mappings arrive too.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        return_map = bool((params or {}).get("return_map", False))
        try:
            rows = request_rows(model_input)
        except RequestShapeError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        sources = [row_source(i, row, self.root) for i, row in enumerate(rows)]
        results = self.predictor.predict_batch(sources)
        self.log.record(results, sources, self.predictor.thresholds)  # queued: the answer does not wait for it
        return pd.DataFrame([self.output_row(r, return_map) for r in results], columns=list(OUTPUT_COLUMNS))

    def output_row(self, r: ImagePrediction, return_map: bool) -> dict[str, Any]:
        if r.error:
            return {"name": r.path, "score": float("nan"), "is_anomalous": False, "threshold": float("nan"),
                    "regions": "[]", "map_png": "", "error": r.error}  # fmt: skip
        return {
            "name": r.path,
            "score": r.score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
            "regions": json.dumps(self.predictor.regions(r)),
            "map_png": map_png(r.anomaly_map) if return_map else "",
            "error": "",
        }


mlflow.models.set_model(AdpsPyfunc())
