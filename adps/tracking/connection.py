"""Where MLflow is: the tracking URI (environment or params), a server that must answer, a local
store that must exist before it is read."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from adps import paths
from adps.config import Params
from adps.errors import AdpsError
from adps.files import waiting_lock

logger = logging.getLogger(__name__)


class TrackingUnavailable(AdpsError):
    """The MLflow tracking server cannot be reached."""


def tracking_uri(params: Params) -> str:
    """``MLFLOW_TRACKING_URI`` or ``tracking.uri``; relative sqlite paths made absolute (DVC temp dirs)."""
    return paths.absolute_sqlite_url(os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri, params.root)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with what to do, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({err}). Start it (`make up`) or unset "
            "MLFLOW_TRACKING_URI to use the local sqlite store; local models and reports are untouched."
        ) from err


def connect(params: Params, create: bool = True):
    """Point MLflow at the tracking store and return a client (see :func:`open_client`)."""
    from mlflow.exceptions import MlflowException

    try:
        return open_client(params, create)
    except MlflowException as err:
        raise AdpsError(f"cannot use the MLflow store {tracking_uri(params)}: {err.message}") from err


def open_client(params: Params, create: bool = True):
    """Point MLflow at the tracking store and return a client.

    ``create=False`` (reading the registry, promoting): a local sqlite store that does not exist is
    an error, never a new empty database.
    """
    import mlflow

    uri = tracking_uri(params)
    check_reachable(uri)
    if not create:
        check_store_exists(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(uri)
    with waiting_lock(Path(uri.removeprefix("sqlite:///") + ".lock")):  # the first client creates the tables:
        return mlflow.MlflowClient(uri)  # one process at a time (e.g. tuning started on two hosts at once)


def check_store_exists(uri: str) -> None:
    """A local sqlite store must exist before anything is read from it."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise AdpsError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: nothing is registered there. Run `adps register` "
            "(or `make run`) in the project first, run the command inside the project, or set MLFLOW_TRACKING_URI."
        )


def use_experiment(params: Params) -> None:
    """Make ``tracking.experiment`` the active experiment, creating it when missing.

    With a local store its artifacts go to ``<project root>/mlruns`` whatever the working directory
    (MLflow's default is the creating process's cwd); a server decides for itself (proxied artifacts).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    name = params.tracking.experiment
    if not tracking_uri(params).startswith(("http://", "https://")) and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=(params.root / "mlruns").as_uri())
        except MlflowException as err:  # another process created it first
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)
