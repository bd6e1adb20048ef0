"""MLflow pyfunc of a trained ADPS model (models-from-code): weights, thresholds and preprocessing inside.

Input: one image per row, in any of these shapes (:data:`ACCEPTED_INPUT`): a frame with column
``image`` = the image file's bytes, base64-encoded (PNG, JPEG, TIFF, BMP), or ``path`` = a file on the
server, accepted only when the server was started with ``ADPS_SERVE_ALLOWED_ROOT=<folder>`` and the
file lies under it; or a bare list of base64 strings (``{"instances": [...]}`` / ``{"inputs": [...]}``
over REST). Any other shape, or no image at all, is refused with HTTP 400 naming the expected input:
never an empty answer. Param ``return_map`` (default false) adds the anomaly map as a base64 PNG.

Output, one row per input, in order: ``name``, ``score``, ``is_anomalous``, ``threshold`` (image
level), ``regions`` (JSON list of connected regions above the pixel threshold: x, y, width, height,
area in input-image pixels, peak score), ``map_png`` and ``error``. A row that cannot be read (bad
base64, not an image, too large, refused path) gets its ``error`` and the other rows are still scored.

The model has no input schema: MLflow would drop unknown columns (and, with every column optional,
hand the model an empty frame); reading the request here keeps every shape's answer or error ours.
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
INPUT_COLUMNS = ("image", "path")
OUTPUT_COLUMNS = ("name", "score", "is_anomalous", "threshold", "regions", "map_png", "error")
ACCEPTED_INPUT = (
    "one image per row: column 'image' = the image file's bytes in base64 (or 'path', where the server allows "
    'it), or a bare list of base64 strings. Over REST: {"dataframe_split": {"columns": ["image"], "data": '
    '[["<base64>"], ...]}}, {"dataframe_records": [{"image": "<base64>"}, ...]}, {"instances": ["<base64>", '
    '...]} or {"inputs": ["<base64>", ...]}'
)


class RequestShapeError(AdpsError):
    """A request that is not one image per row in an accepted shape (HTTP 400)."""

    def __init__(self, got: str):
        super().__init__(f"expected {ACCEPTED_INPUT}; got {got}")


def request_rows(model_input: Any) -> list[dict[str, Any]]:
    """The request as one ``{"image"|"path": value}`` dict per image, whatever accepted shape it came in.

    Raises:
        RequestShapeError: no column ``image`` or ``path``, a bare list of non-strings, or no image.
    """
    frame = request_frame(model_input)
    columns = [c for c in INPUT_COLUMNS if c in frame.columns]
    if not columns:
        raise RequestShapeError(f"columns {[str(c) for c in frame.columns]}")
    if frame.columns.duplicated().any():
        raise RequestShapeError(f"a column named twice ({[str(c) for c in frame.columns]})")
    if frame.empty:
        raise RequestShapeError("no image (zero rows)")
    return [{k: scalar(v) for k, v in row.items()} for row in frame[columns].to_dict("records")]


def scalar(value: Any) -> Any:
    """A cell as a plain value (MLflow hands ``inputs`` records over as 0-d numpy arrays)."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def request_frame(model_input: Any) -> pd.DataFrame:
    """A frame of the request: a frame as is, a mapping of columns, a list of records or of base64 strings."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        try:
            return pd.DataFrame({k: np.atleast_1d(v) for k, v in model_input.items()})
        except ValueError as err:
            raise RequestShapeError(f"columns of different lengths ({err})") from None
    if isinstance(model_input, pd.Series | np.ndarray | list | tuple):
        values = np.asarray(model_input, dtype=object)
        values = values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values
        if values.ndim == 1 and len(values) and all(isinstance(v, dict) for v in values):
            return pd.DataFrame(list(values))
        if values.ndim == 1 and all(isinstance(v, str) or v is None for v in values):
            return pd.DataFrame({"image": values})  # a None gets its own row error
        raise RequestShapeError(f"a list whose items are not base64 strings (shape {values.shape})")
    raise RequestShapeError(type(model_input).__name__)


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
