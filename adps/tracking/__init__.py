"""MLflow tracking and registry, one concern per module.

``connection`` (where MLflow is), ``lineage`` (what a model is made of and where it came from),
``runs`` (one run per category), ``registry`` (the pyfunc model, versions, aliases, promotion) and
``studies`` (Optuna studies as parent and trial runs). The names other layers use are these.
"""

from adps.tracking.connection import TrackingUnavailable, connect, tracking_uri, use_experiment
from adps.tracking.lineage import git_tags, served_code
from adps.tracking.registry import CHALLENGER, CHAMPION, load_registered_predictor, model_name, promote, register
from adps.tracking.studies import fail_trial_run, log_study_summary, study_parent_run, trial_run

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "TrackingUnavailable",
    "connect",
    "fail_trial_run",
    "git_tags",
    "load_registered_predictor",
    "log_study_summary",
    "model_name",
    "promote",
    "register",
    "served_code",
    "study_parent_run",
    "tracking_uri",
    "trial_run",
    "use_experiment",
]
