"""The served model's input and output: the one statement of what a client sends and gets back.

``adps/serving.py`` reads requests with :func:`request_rows` and answers :data:`OUTPUT_COLUMNS`;
the registry builds the model's signature and description from the same names. Plain pandas and
numpy only: no MLflow here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from adps.errors import AdpsError

INPUT_COLUMNS = ("image", "path")
OUTPUT_COLUMNS = {  # name -> MLflow column type, in answer order
    "name": "string",
    "score": "double",
    "is_anomalous": "boolean",
    "threshold": "double",
    "regions": "string",
    "map_png": "string",
    "error": "string",
}
NULLABLE_COLUMNS = ("score", "is_anomalous", "threshold")  # null on a row that has an error
OUTPUT_DESCRIPTION = (
    "one row per image, in order: `name`; `score`; `is_anomalous` (score >= the image threshold chosen on "
    "the validation split); `threshold`; `regions` (JSON list of connected regions above the pixel threshold: "
    "x, y, width, height, area in input-image pixels, peak score); `map_png` (base64 16-bit PNG of the "
    "anomaly map, with param `return_map: true`); `error` (per row: the other rows are still answered; such a "
    "row has null score, is_anomalous and threshold)"
)
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
