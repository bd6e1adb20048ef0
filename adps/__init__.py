"""ADPS: Asymmetric Distillation Post-Segmentation anomaly detection, as an MLOps pipeline."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

TELEMETRY_ENV_FILE = Path(__file__).with_name("telemetry.env")


def read_telemetry_env() -> dict[str, str]:
    """Return the telemetry switches of ``telemetry.env`` as a dict."""
    pairs = {}
    for line in TELEMETRY_ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def disable_telemetry() -> None:
    """Turn telemetry off for this process and its children, unless the user set a value."""
    for key, value in read_telemetry_env().items():
        os.environ.setdefault(key, value)


disable_telemetry()
