"""MLflow helpers shared by training, evaluation and the registry."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# the embedded store: sqlite in the working folder (platform.md's default deployment)
DEFAULT_TRACKING = "sqlite:///mlflow.db"
# tag on a training run: the run name (tracking.run_name) its latest launch was given; a
# resumed run keeps its first mlflow.runName, so a Kubernetes flow finds its Job's run by this
RUN_NAME_TAG = "clipgs.run_name"


def tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else the standard MLFLOW_TRACKING_URI (set on a cluster), else the
    embedded sqlite store in the working folder."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def setup_mlflow(tracking_uri: str, experiment: str | None = None):
    """Point MLflow at the store (and the experiment). A new sqlite store creates its tables
    on first use, and processes started together race to: a half-done migration leaves the
    file unusable for all of them (``table _alembic_tmp_latest_metrics already exists``). So on
    sqlite one process at a time (a lock file beside the database) sets the store up and
    creates the experiment."""
    import mlflow
    from filelock import FileLock

    mlflow.set_tracking_uri(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock") if db is not None else contextlib.nullcontext():
        if db is not None:
            mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)  # tables, once
        if experiment:
            mlflow.set_experiment(experiment)
    return mlflow


def resume_run(run_id: str, **kwargs):
    """``mlflow.start_run`` on an existing run, in that run's own experiment. MLflow keeps the
    active experiment id process-wide (``set_experiment`` also exports it as
    MLFLOW_EXPERIMENT_ID) and refuses to resume a run of any other experiment, so a process
    that used another store or experiment before would fail here. New runs are started after
    ``setup_mlflow`` names their experiment, never in whatever id was left active."""
    import mlflow

    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment)
    return mlflow.start_run(run_id=run_id, **kwargs)


class BufferedMetrics:
    """Metric logging that never stops or slows training: ``log`` only appends to a bounded
    in-memory queue; a background thread sends the queue in batches (``log_batch``) and, while
    the tracking server is unreachable, keeps the values and retries with back-off, so they
    reach the run when the server answers again. Beyond ``capacity`` values the oldest are
    dropped (counted in ``dropped``, warned once)."""

    BATCH = 1000  # MLflow's log_batch limit on metrics per request

    def __init__(self, run_id: str, tracking_uri: str, capacity: int = 10000,
                 retry_s: float = 1.0, max_retry_s: float = 30.0):
        from mlflow import MlflowClient

        self.run_id, self.capacity = run_id, capacity
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.client = MlflowClient(tracking_uri)
        self.queue: collections.deque = collections.deque()
        self.dropped = 0
        self.failing = False
        self._cond = threading.Condition()
        self._closed = False
        self._wake = False  # flush() asks a sender waiting out its back-off to try now
        self._thread = threading.Thread(target=self._run, name="clipgs-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._cond:
            self.queue.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            over = len(self.queue) - self.capacity
            if over > 0:
                if not self.dropped:
                    log.warning("metric buffer full (%d values, tracking server unreachable): "
                                "dropping the oldest", self.capacity)
                for _ in range(over):
                    self.queue.popleft()
                self.dropped += over
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self.queue)

    def _run(self) -> None:
        delay = self.retry_s
        while True:
            with self._cond:
                while not self.queue and not self._closed:
                    self._cond.wait()
                if not self.queue:
                    return
                batch = [self.queue[i] for i in range(min(self.BATCH, len(self.queue)))]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - any tracking failure is survivable here
                if not self.failing:
                    first = (str(exc).splitlines() or [type(exc).__name__])[0]
                    log.warning("could not send %d metric values to MLflow (%s); keeping them "
                                "and retrying", len(batch), first[:200])
                self.failing = True
                with self._cond:
                    # the back-off holds whatever log() does (its notify is for an idle
                    # sender); only flush() and close() cut it short
                    retry_at = time.monotonic() + delay
                    while not (self._closed or self._wake) and time.monotonic() < retry_at:
                        self._cond.wait(retry_at - time.monotonic())
                    self._wake = False
                    if self._closed:
                        return
                delay = min(delay * 2, self.max_retry_s)
                continue
            if self.failing:
                log.warning("MLflow answers again; buffered metrics sent")
            self.failing, delay = False, self.retry_s
            sent = {id(m) for m in batch}
            with self._cond:
                # the batch was the queue's head; the bound may have dropped part of it since
                while self.queue and id(self.queue[0]) in sent:
                    self.queue.popleft()
                self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything logged so far is sent (True) or ``timeout`` passes (False)."""
        deadline = time.time() + timeout
        with self._cond:
            self._wake = True
            self._cond.notify_all()
            while self.queue and time.time() < deadline:
                self._cond.wait(min(0.2, max(0.0, deadline - time.time())))
            return not self.queue

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the thread; values still unsent after ``timeout`` are reported."""
        ok = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if not ok:
            log.warning("%d metric values could not be sent to MLflow before the run ended",
                        self.pending())
        return ok
