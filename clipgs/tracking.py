"""MLflow helpers shared by training, evaluation and the registry."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def setup_mlflow(tracking_uri: str, experiment: str | None = None):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if experiment:
        mlflow.set_experiment(experiment)
    return mlflow


def log_metrics_safely(metrics: dict[str, float], step: int) -> None:
    """Metrics are for people; a tracking server that hiccups must not stop training."""
    import mlflow

    try:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
    except Exception as exc:  # noqa: BLE001 - any tracking failure is survivable here
        log.warning("could not log metrics at step %d to MLflow: %s", step, exc)
