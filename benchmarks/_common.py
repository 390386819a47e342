"""What several benchmarks set up the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from clipgs.train.launch import free_port


def single_rank_env() -> None:
    """The environment of a one-rank distributed run on the CPU (what torchrun would set)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def moto_server() -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on loopback: (process, endpoint URL); stop it when done."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"
