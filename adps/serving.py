"""MLflow pyfunc of a trained ADPS model (models-from-code): weights, thresholds and preprocessing inside.

What a client sends and gets back is stated once, in :mod:`adps.serving_contract`. Column ``path``
(a file on the server) is read only when the server was started with
``ADPS_SERVE_ALLOWED_ROOT=<folder>`` and the file lies under it. A row that cannot be read (bad
base64, not an image, too large, refused path) gets its ``error`` and the other rows are still scored.

The model has no input schema: MLflow would drop unknown columns (and, with every column optional,
hand the model an empty frame); reading the request here keeps every shape's answer or error ours.

Every answered row is recorded in the prediction log (:mod:`adps.production.log`) of the project the
server runs in (its params.yaml, found from the working directory), or of ``ADPS_PREDICTION_LOG``.

The same project's pixel budget (``production.max_image_megapixels``, ``max_request_megapixels``; the
defaults outside a project) is checked from each image's header before decoding: an image over it is
its row's error, a request whose images are together over it is HTTP 413. HTTP statuses come from
MLflow's scoring server, which maps an ``MlflowException``'s error code through its own table (400 for
INVALID_PARAMETER_VALUE, 500 for INTERNAL_ERROR; no code maps to 413) and answers any other exception
with 400 and the stack trace in the body. So every failure leaves :meth:`AdpsPyfunc.predict` as an
``MlflowException`` without a trace: a request the model cannot read is 400, one too large is 413
(:func:`request_too_large`), anything else is the server's fault: 500, its trace in the server's log only.
An answer is always valid JSON: a row without a score has null (never NaN) in ``score``,
``is_anomalous`` and ``threshold``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_LIMIT_EXCEEDED
from PIL import Image

from adps.config import Params
from adps.errors import AdpsError
from adps.files import finite_json, path_text
from adps.inference import ImagePrediction, ImageSource, PixelBudget, Predictor, RequestOverBudget, failure_text
from adps.production.log import PredictionLog, log_settings, params_where_served, settings_where_served
from adps.runtime import pin_cpu_kernels
from adps.serving_contract import NULLABLE_COLUMNS, OUTPUT_COLUMNS, RequestShapeError, request_rows

logger = logging.getLogger(__name__)
ALLOWED_ROOT_ENV = "ADPS_SERVE_ALLOWED_ROOT"


class ServedError(MlflowException):
    """A request the served model refuses or fails on, answered with this message alone.

    MLflow's scoring server rewrites the message of any ``MlflowException`` from ``predict`` to
    ``Failed to predict data '<the whole request>'``: a 96 MB request refused as too large would come back
    as a 96 MB answer. This message ignores that rewrite (the request stays in the client's hands).
    """

    def __init__(self, message: str, error_code: int, status: int | None = None):
        self.own_message, self.status = message, status
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self.own_message

    @message.setter
    def message(self, _value: str) -> None:  # the scoring server's prefix, which quotes the request: left out
        pass

    def get_http_status_code(self) -> int:
        return self.status or super().get_http_status_code()


def request_too_large(message: str) -> ServedError:
    """A request whose images are together over the pixel budget: HTTP 413 Content Too Large.

    MLflow's table maps no error code to 413 (RESOURCE_LIMIT_EXCEEDED, the code that says what happened,
    would be a 500), and its scoring server asks the exception itself for the status
    (``get_http_status_code``): this one says 413, and its body carries RESOURCE_LIMIT_EXCEEDED.
    """
    return ServedError(message, RESOURCE_LIMIT_EXCEEDED, 413)


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
        name = path_text(path)  # a client's text: NUL and control characters shown escaped, in answers and the log
        try:
            return ImageSource(name, path=allowed_path(path, root))
        except AdpsError as err:
            return ImageSource(name, error=str(err))
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
        params = params_where_served()
        pin_cpu_kernels((params or Params()).runtime.cpu_kernels)  # the kernels evaluate chose thresholds with
        self.predictor = Predictor.from_dir(context.artifacts["model_dir"])  # what library callers unwrap: no budget
        self.served = self.predictor.with_budget(PixelBudget.from_params(params))  # what answers requests
        self.root = allowed_root()
        category = self.predictor.thresholds.get("category") or "unknown"
        settings = log_settings(params) if params is not None else settings_where_served()
        self.log = PredictionLog(settings, "serve", f"adps-{category}")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One output row per image of ``model_input`` (any shape of :func:`request_rows`).

        ``pd.DataFrame`` is the hint MLflow derives no input schema from; lists and mappings arrive too.

        Raises:
            MlflowException: HTTP 400 for a request that is not images in an accepted shape,
                :func:`request_too_large` (413) over the pixel budget, 500 for anything else (no trace in it).
        """
        try:
            return self.answer(model_input, params or {})
        except RequestShapeError as err:
            raise ServedError(str(err), INVALID_PARAMETER_VALUE) from None
        except RequestOverBudget as err:
            raise request_too_large(str(err)) from None
        except Exception as err:
            logger.exception("the served model failed on a request")
            raise ServedError(
                f"the served model failed on this request ({type(err).__name__}); the server's log has the details",
                INTERNAL_ERROR,
            ) from None

    def answer(self, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
        return_map = bool(params.get("return_map", False))
        rows = request_rows(model_input)
        sources = [row_source(i, row, self.root) for i, row in enumerate(rows)]
        results = self.served.predict_batch(sources)
        try:
            self.log.record(results, sources, self.served.thresholds)  # queued: the answer does not wait for it
        except Exception as err:  # the answer stands without its log rows
            logger.warning("prediction log: %d rows not recorded: %s", len(results), failure_text(err))
        return answer_frame([self.answer_row(r, return_map) for r in results])

    def answer_row(self, r: ImagePrediction, return_map: bool) -> dict[str, Any]:
        """One image's answer; a failure while building it is that row's error, never the request's."""
        try:
            return self.output_row(r, return_map)
        except Exception as err:
            logger.warning("answer of %s not built: %s", r.path, failure_text(err))
            return error_row(r.path, f"scored, but its answer could not be built: {failure_text(err)}")

    def output_row(self, r: ImagePrediction, return_map: bool) -> dict[str, Any]:
        if r.error:
            return error_row(r.path, r.error)
        return {
            "name": r.path,
            "score": r.score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
            "regions": json.dumps(finite_json(self.predictor.regions(r)), allow_nan=False),
            "map_png": map_png(r.anomaly_map) if return_map else "",
            "error": "",
        }


def error_row(name: str, error: str) -> dict[str, Any]:
    """A row without a score: null (None) where a scored row has a number or a decision."""
    return {"name": name, "score": None, "is_anomalous": None, "threshold": None, "regions": "[]", "map_png": "",
            "error": error}  # fmt: skip


def answer_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The answer as a frame whose JSON has null, never NaN, where a row has no score.

    pandas stores None in a float column as NaN, and MLflow writes NaN as a bare ``NaN`` (invalid JSON: a
    strict client loses every row); such columns are kept as objects holding None. A float that is not a
    number in a scored row would be the same fault, so it is None too.
    """
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    for column in NULLABLE_COLUMNS:
        values = frame[column]
        missing = values.isna() | values.map(lambda v: isinstance(v, float) and not np.isfinite(v))
        if missing.any():
            frame[column] = values.astype(object).where(~missing, None)
    return frame


mlflow.models.set_model(AdpsPyfunc())
