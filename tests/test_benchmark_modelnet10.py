"""The ModelNet10 benchmark's MLflow run, on a 40-object subset of the real ModelNet10 and a
few training steps (the figures need the whole benchmark; this checks what reaches MLflow):
params, the live training curve, the final figures, plots and files; eval-only runs of one
and several weight files; a failing run marked FAILED, not left RUNNING or FINISHED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def command(tmp: Path, *flags: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return ([sys.executable, "-m", "benchmarks.modelnet10", "--limit", "40", "--threads", "1",
             "--precision", "fp32", "--workdir", str(tmp / "work"), "--mlflow",
             f"sqlite:///{tmp / 'mlflow.db'}", *flags], env)


def bench(tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd, env = command(tmp, *flags)
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def runs(tmp: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmark-modelnet10")
    return client, client.search_runs([experiment.experiment_id],
                                      order_by=["attributes.start_time ASC"])


def test_modelnet10_benchmark_logs_to_mlflow(tmp_path, shared_data):
    done = bench(tmp_path, "--steps", "6", "--log-every", "2", "--ema", "0.9", "--votes", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    result_file = next((tmp_path / "work").glob("result-*-s6-seed0-*.json"))
    res = json.loads(result_file.read_text())["result"]
    client, (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == result_file.stem
    assert run.data.tags["clipgs.benchmark_mode"] == "train"
    assert run.data.params["steps"] == "6" and run.data.params["ema"] == "0.9"
    assert run.data.params["precision_chosen"] == "fp32"
    assert "mlflow" not in run.data.params  # the tracking URI may carry credentials
    m = run.data.metrics
    assert m["zeroshot_top1"] == pytest.approx(res["zeroshot_top1"])
    assert m["ema.zeroshot_top1"] == pytest.approx(res["ema"]["zeroshot_top1"])
    assert m["zeroshot_top1_votes2"] == pytest.approx(res["zeroshot_top1_votes2"])
    # per-class accuracy from the confusion matrix: 4 test objects per class in this subset
    confusion = res["confusion"]
    assert m["class_acc.chair"] == pytest.approx(confusion[2][2] / sum(confusion[2]))
    # the curve, one point per logged step, as the JSON's history has it
    curve = client.get_metric_history(run.info.run_id, "loss")
    logged = [r for r in json.loads(result_file.read_text())["history"] if "loss" in r]
    assert [(p.step, p.value) for p in curve] == [(r["step"], r["loss"]) for r in logged]
    assert [p.step for p in curve] == [2, 4, 6]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    stem = result_file.stem
    assert {f"{stem}.json", f"{stem}.safetensors", f"{stem}-ema.safetensors"} <= files
    assert plots == {"plots/confusion_matrix.png", "plots/training_curves.png"}
    local = Path(client.download_artifacts(run.info.run_id, f"{stem}.safetensors", str(tmp_path)))
    assert load_file(local).keys() == load_file(result_file.with_suffix(".safetensors")).keys()

    # eval-only: two weight files -> each one's figures under runN. and their ensemble
    weights = [str(result_file.with_suffix(".safetensors")),
               str(result_file.with_name(stem + "-ema.safetensors"))]
    done = bench(tmp_path, "--eval-only", *weights)
    assert done.returncode == 0, done.stderr[-3000:]
    client, (_, evaluated) = runs(tmp_path)
    assert evaluated.info.status == "FINISHED"
    assert evaluated.data.tags["clipgs.benchmark_mode"] == "eval-only"
    m = evaluated.data.metrics
    assert {"run0.zeroshot_top1", "run1.zeroshot_top1", "zeroshot_top1_ensemble"} <= set(m)
    # the same weights on the same seed's test subset give the same figure as training's
    assert m["run0.zeroshot_top1"] == pytest.approx(res["zeroshot_top1"])
    plots = {a.path for a in client.list_artifacts(evaluated.info.run_id, "plots")}
    assert plots == {"plots/run0.confusion_matrix.png", "plots/run1.confusion_matrix.png"}

    # weights of another model configuration: a one-line error, and the run is FAILED
    done = bench(tmp_path, "--eval-only", weights[0], "--position-colour-only")
    assert done.returncode != 0
    assert "does not fit the model these flags build" in done.stderr
    _, (*_, failed) = runs(tmp_path)
    assert failed.info.status == "FAILED"
    # a file that is not there: named in one line, and that run FAILED too
    done = bench(tmp_path, "--eval-only", str(tmp_path / "missing.safetensors"))
    assert done.returncode != 0
    assert "missing.safetensors: cannot read it as safetensors weights" in done.stderr
    _, every = runs(tmp_path)
    assert [r.info.status for r in every] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]


def test_modelnet10_benchmark_bad_tracking_uri_fails_first(tmp_path, shared_data):
    done = bench(tmp_path, "--steps", "2", "--mlflow", "bogus://nowhere")
    assert done.returncode != 0
    assert "--mlflow bogus://nowhere: cannot open an MLflow run there" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "work").exists()  # it stopped before the cache, let alone training


def test_modelnet10_benchmark_sigterm_marks_the_run_failed(tmp_path, shared_data):
    """A scheduler's SIGTERM in the middle of training: the run is FAILED, not RUNNING."""
    cmd, env = command(tmp_path, "--steps", "100000", "--log-every", "1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:  # until training has logged a few steps
        if " step 3 " in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert not list((tmp_path / "work").glob("result-*.json"))  # no result looks complete


def test_modelnet10_runs_started_together_on_a_new_store_all_open(tmp_path):
    """Ablations started side by side on a fresh sqlite file race to create its tables and
    the experiment; setup_mlflow lets one at a time set the store up (a file lock beside it),
    so every one of them gets its run."""
    code = ("import argparse, sys; from benchmarks._modelnet10_mlflow import open_run; "
            "r = open_run(sys.argv[1], 'benchmark-modelnet10', None, "
            "argparse.Namespace(seed=0), 'train'); r.finish({}, [])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'mlflow.db'}"],
                              cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    _, every = runs(tmp_path)
    assert [r.info.status for r in every] == ["FINISHED"] * 4
