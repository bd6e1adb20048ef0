"""MLflow pyfunc of a trained ADPS model (models-from-code): weights, thresholds and preprocessing inside.

Input: a DataFrame with a ``path`` column (image files). Output: one row per image with ``score``,
``is_anomalous``, ``threshold`` and ``error`` (non-empty when the file could not be read).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

from adps.inference import Predictor


class AdpsPyfunc(mlflow.pyfunc.PythonModel):
    """Loads ``psm.pt`` + ``thresholds.json`` once from the logged ``model_dir`` artifact."""

    def load_context(self, context: Any) -> None:
        self.predictor = Predictor.from_dir(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        results = self.predictor.predict_paths(list(model_input["path"]))
        return pd.DataFrame(
            {
                "path": [r.path for r in results],
                "score": [float("nan") if r.score is None else r.score for r in results],
                "is_anomalous": [bool(r.is_anomalous) for r in results],
                "threshold": [self.predictor.thresholds["image"]] * len(results),
                "error": [r.error for r in results],
            }
        )


mlflow.models.set_model(AdpsPyfunc())
