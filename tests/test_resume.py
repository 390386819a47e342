"""A rank dies mid-run (SIGKILL, as the OOM killer or a lost node does it): the 2-rank ZeRO-1
run fails, the restarted run resumes from the last complete checkpoint and ends at the same
step with the same number of samples seen, in the same MLflow run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_train import check_resumed


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "clipgs.train.trainer" in " ".join(child.cmdline()) and \
                    child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_sigkill_one_rank_then_resume(tiny_dataset, tmp_path):
    from clipgs.cli import main
    from clipgs.train.checkpoint import MARKER, complete_steps

    db, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "train"
    overrides = [f"data={tiny_dataset}", f"output_dir={out}", "zero_stage=1", "steps=40",
                 "checkpoint_every=4", "log_every=4", "micro_batch=4", "loader_workers=0",
                 "grouping=device", "data_mode=split", "model.depth=1", "model.width=48",
                 "optim.warmup_steps=4", "keep_checkpoints=2"]
    cmd = [sys.executable, "-m", "clipgs.cli", "train", "--nproc", "2", "--tracking-uri", db,
           *overrides]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step0000008" / MARKER).exists():
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 8 within 300 s"
            time.sleep(0.05)
        victim = _rank_process(launcher, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, "the run finished before the kill: make it longer"
    assert "training failed" in err
    assert not (out / "train_result.json").exists()  # a dead run never looks complete
    last = max(complete_steps(str(out / "checkpoints")))
    assert 8 <= last < 40

    assert main(["train", "--nproc", "2", "--tracking-uri", db, *overrides]) == 0
    check_resumed(out, db, overrides, resumed_from=last)
    assert json.loads((out / "checkpoints" / "step0000040" / MARKER).read_text())[
        "samples_seen"] == 40 * 4 * 2
