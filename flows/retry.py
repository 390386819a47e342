"""Which failures are worth retrying: transient I/O against object storage, MLflow and the
Kubernetes API (connection refused or reset, timeouts, throttling, 5xx). Anything else - a bad
config, a missing file, a model that does not fit - fails at once: a retry would only repeat it.

Stages attach ``TRANSIENT_IO`` to their I/O tasks: a few retries with exponential back-off and
jitter, and ``retry_if_transient`` as the condition.
"""

from __future__ import annotations

import os

from prefect.tasks import exponential_backoff

# HTTP statuses a server returns while it is overloaded or restarting
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_RETRY_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}
# not INTERNAL_ERROR: MlflowException's default code, also raised for plain bad input; a
# server that keeps failing surfaces as "Max retries exceeded" once MLflow's own retries end
_RETRY_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED",
                       "DEADLINE_EXCEEDED"}


def _causes(exc: BaseException):
    """The exception and everything it was raised from or while handling (clipgs wraps I/O
    errors in StorageError ``from None``, which keeps the original as ``__context__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _one_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused, reset, aborted, timed out
        return True
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith("botocore"):
        if name in {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ProxyConnectionError", "ConnectionError"}:
            return True
        if name == "ClientError":
            err = getattr(exc, "response", {}) or {}
            status = err.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return err.get("Error", {}).get("Code") in _RETRY_S3_CODES or status in _RETRY_STATUS
    if module.startswith(("urllib3", "requests")) and name in {
            "ConnectionError", "NewConnectionError", "MaxRetryError", "ProtocolError",
            "ReadTimeoutError", "ConnectTimeout", "ReadTimeout", "Timeout"}:
        return True
    if module.startswith("mlflow") and name in {"MlflowException", "RestException"}:
        code = getattr(exc, "error_code", None)
        return code in _RETRY_MLFLOW_CODES or "Max retries exceeded" in str(exc)
    if module.startswith("kubernetes") and name == "ApiException":
        return getattr(exc, "status", None) in _RETRY_STATUS or getattr(exc, "status", 1) == 0
    return False


def is_transient(exc: BaseException | None) -> bool:
    return exc is not None and any(_one_is_transient(e) for e in _causes(exc))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry only transient I/O failures."""
    exc = state.data if isinstance(state.data, BaseException) else \
        state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


# The first retry waits CLIPGS_RETRY_BACKOFF_S (default 5 s), then 2x, 4x; tests shorten it.
_BACKOFF_S = float(os.environ.get("CLIPGS_RETRY_BACKOFF_S", "5"))
TRANSIENT_IO = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=_BACKOFF_S),
                    retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient)
