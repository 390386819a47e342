"""Shared fixtures: the real data of ../shared/data, and one tiny ingested dataset that the
training, evaluation and registry tests reuse (built once per session)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# after the environment above (it imports the trainer); tests import free_port from here
from clipgs.train.launch import free_port  # noqa: E402, F401

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (tests use the real data beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def teacher():
    from clipgs.models.teacher import Teacher

    return Teacher()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, teacher) -> Path:
    """Primitives (4 per class) ingested into shards, with the default teacher."""
    from clipgs.config import IngestConfig
    from clipgs.data.ingest import ingest
    from clipgs.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny")
    src = generate(root / "primitives", per_class=6, gaussians=1024)
    ingest(str(src), str(root / "shards"), IngestConfig(shard_size=12), teacher=teacher)
    return root / "shards"


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3-compatible server on loopback, reached through the real boto3 client."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    from clipgs.data import storage

    storage._client_for_pid.cache_clear()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    storage.s3_client().create_bucket(Bucket="clipgs")
    yield "s3://clipgs"
    proc.terminate()
    proc.wait(10)
    storage._client_for_pid.cache_clear()


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str
                  ) -> None:
    """Until ``url`` answers 200. A server process that exits or does not answer in time is
    killed (its whole session) and the test fails with the end of its log."""
    import requests

    deadline = time.time() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            try:
                os.killpg(proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            pytest.fail(f"{what} did not come up:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen) -> None:
    """A server and its workers (their own process group): TERM, then KILL."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def fails(capsys, *argv) -> str:
    """A `clipgs` command that fails the expected way: exit 2, its error on one line."""
    from clipgs.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"clipgs {argv[0]}: error: "), err
    return line
