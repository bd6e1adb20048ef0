"""MLflow pyfunc of a trained ADPS model (models-from-code): weights, thresholds and preprocessing inside.

Input, one row per image: ``image`` = the image file's bytes, base64-encoded (PNG, JPEG, TIFF, BMP),
or ``path`` = a file on the server, accepted only when the server was started with
``ADPS_SERVE_ALLOWED_ROOT=<folder>`` and the file lies under it. Param ``return_map`` (default false)
adds the anomaly map as a base64 PNG.

Output, one row per input, in order: ``name``, ``score``, ``is_anomalous``, ``threshold`` (image
level), ``regions`` (JSON list of connected regions above the pixel threshold: x, y, width, height,
area in input-image pixels, peak score), ``map_png`` and ``error``. A row that cannot be read (bad
base64, not an image, too large, refused path) gets its ``error`` and the other rows are still scored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from adps.errors import AdpsError
from adps.inference import ImagePrediction, ImageSource, Predictor, allowed_path

ALLOWED_ROOT_ENV = "ADPS_SERVE_ALLOWED_ROOT"
OUTPUT_COLUMNS = ("name", "score", "is_anomalous", "threshold", "regions", "map_png", "error")


def allowed_root() -> Path | None:
    root = os.environ.get(ALLOWED_ROOT_ENV)
    return Path(root) if root else None


def row_source(index: int, row: dict[str, Any], root: Path | None) -> ImageSource:
    """The image of one input row, or the reason it is refused."""
    image, path = row.get("image"), row.get("path")
    if isinstance(image, str) and image:
        try:
            return ImageSource(f"row {index}", data=base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError) as err:
            return ImageSource(f"row {index}", error=f"column 'image' is not valid base64: {err}")
    if isinstance(path, str) and path:
        try:
            return ImageSource(path, path=allowed_path(path, root))
        except AdpsError as err:
            return ImageSource(path, error=str(err))
    return ImageSource(f"row {index}", error="give the image as base64 in column 'image'")


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

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return_map = bool((params or {}).get("return_map", False))
        sources = [row_source(i, row, self.root) for i, row in enumerate(model_input.to_dict("records"))]
        results = self.predictor.predict_batch(sources)
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
