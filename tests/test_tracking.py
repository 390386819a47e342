"""Metric logging survives a tracking server that goes away: a real `mlflow server` on
loopback is stopped mid-run and started again on the same store."""

import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port


def _start_server(db: str, artifacts: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db,
         "--default-artifact-root", artifacts, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 90 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_metrics_buffered_while_server_is_down_then_flushed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from clipgs.tracking import BufferedMetrics

    # MLflow's own HTTP retries would hold the sender thread for minutes per attempt
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    db, artifacts = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts")
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(db, artifacts, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("t")).info.run_id
        metrics = BufferedMetrics(run_id, uri, capacity=8, retry_s=0.2, max_retry_s=1.0)
        for step in (1, 2):
            metrics.log({"loss": 1.0 / step}, step)
        assert metrics.flush(30)

        _stop(server)
        t0 = time.time()
        for step in range(3, 8):  # the "training loop" while the server is gone
            metrics.log({"loss": 1.0 / step, "lr": 0.1}, step)
        assert time.time() - t0 < 1.0, "log() must not wait on the network"
        assert not metrics.flush(2)  # nothing can be sent: all kept, up to the bound
        assert metrics.pending() == 8 and metrics.dropped == 2  # 10 values, oldest 2 dropped

        server = _start_server(db, artifacts, port)
        assert metrics.close(60)
        history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
        # step 3's loss and lr were the two oldest values, dropped by the bound
        assert sorted(history) == [1, 2, 4, 5, 6, 7]
        assert history[7] == pytest.approx(1 / 7)
        assert [m.step for m in client.get_metric_history(run_id, "lr")] == [4, 5, 6, 7]
    finally:
        _stop(server)


def test_buffer_bound_without_a_server(monkeypatch):
    """An unreachable URI from the start: values are kept up to the bound, never raised."""
    from clipgs.tracking import BufferedMetrics

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    metrics = BufferedMetrics("0" * 32, f"http://127.0.0.1:{free_port()}", capacity=5,
                              retry_s=0.05, max_retry_s=0.1)
    for step in range(4):
        metrics.log({"a": step, "b": step}, step)
    assert metrics.pending() == 5 and metrics.dropped == 3
    assert not metrics.close(0.5)


def test_backoff_holds_while_training_logs_and_the_sender_survives_any_error(monkeypatch):
    """While the server is down the sender waits out its back-off however often training
    logs (it retried on every log() call before); an error with an empty message does not
    kill it, and what it kept is sent once a request succeeds."""
    from clipgs.tracking import BufferedMetrics

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    metrics = BufferedMetrics("0" * 32, f"http://127.0.0.1:{free_port()}", capacity=1000,
                              retry_s=1.0, max_retry_s=4.0)
    attempts, real = [], metrics.client.log_batch

    def counted(*args, **kwargs):
        attempts.append(time.monotonic())
        return real(*args, **kwargs)

    metrics.client.log_batch = counted
    for step in range(40):  # 2 s of training logging every 50 ms against a refused port
        metrics.log({"loss": step}, step)
        time.sleep(0.05)
    assert 1 <= len(attempts) <= 3, len(attempts)  # t = 0, 1 s (then 3 s)

    sent = []

    def flaky(run_id, metrics=()):
        if not sent:
            sent.append(None)
            raise TimeoutError()  # str() is "": the warning used to raise IndexError
        sent.extend(metrics)

    metrics.client.log_batch = flaky
    assert metrics.flush(10) and metrics._thread.is_alive()
    assert [m.step for m in sent[1:]] == list(range(40))
    assert metrics.close(1)


def test_runs_never_land_in_the_experiment_another_store_left_active(tmp_path, monkeypatch):
    """MLflow keeps the active experiment id process-wide (and exports it): after one store's
    experiment was set, logging to another store in the same process (a flow, a test, a
    notebook) must neither refuse a run of another experiment ("active experiment ID does not
    match") nor put a new run into whatever experiment has that id there."""
    import mlflow
    import mlflow.tracking.fluent

    from clipgs.eval.evaluate import log_to_mlflow
    from clipgs.tracking import setup_mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # set_experiment exports it: undone after
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    setup_mlflow(a, "experiment-of-a")  # id 1 in store a, now the process's active one
    client = mlflow.MlflowClient(b)
    unrelated = client.create_experiment("unrelated")  # id 1 in store b
    training = client.create_run(client.create_experiment("training")).info.run_id
    result = {"metrics": {"zeroshot_top1": 0.5}, "per_class": {"chair": 0.5},
              "dataset_manifest_sha256": "0" * 64, "config": {"plots": False},
              "confusion": None, "embeddings": None}
    assert log_to_mlflow(result, training, b) == training  # onto the training run
    assert client.get_run(training).data.metrics["eval_zeroshot_top1"] == 0.5
    new = client.get_run(log_to_mlflow(result, None, b))  # a new run: in "clipgs", named
    assert new.info.experiment_id != unrelated
    assert client.get_experiment(new.info.experiment_id).name == "clipgs"
