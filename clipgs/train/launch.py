"""``clipgs train``: run in place when a launcher already set the ranks (torchrun, the deepspeed
launcher, a Kubernetes indexed Job), otherwise spawn ``nproc`` local ranks through torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from clipgs.config import TrainConfig, load_config
from clipgs.errors import ClipgsError
from clipgs.train.trainer import RESULT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config_path: str | None, overrides: list[str], nproc: int | None = None) -> dict:
    """One training run; returns its result (``train_result.json``: status, step, steps,
    samples_seen, resumed_from, run_id, package, final_loss, tracking_uri)."""
    config = load_config(TrainConfig, config_path, overrides)  # fail early, in this process
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from clipgs.train.trainer import run

        return run(config)
    from clipgs.train.trainer import preflight

    preflight(config)
    nproc = nproc or config.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--nnodes=1", f"--master_port={free_port()}", "-m", "clipgs.train.trainer"]
    cmd += (["--config", config_path] if config_path else []) + list(overrides)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    result_file = Path(config.output_dir) / RESULT
    result_file.unlink(missing_ok=True)  # never report an older run's result as this one's
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise ClipgsError(f"training failed: {' '.join(cmd)} exited with {proc.returncode}")
    return json.loads(result_file.read_text())
