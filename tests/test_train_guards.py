"""Guards around training runs: the checks made before any rank starts, what a resume
refuses (other data, another rank count, another teacher, a tampered or truncated
checkpoint), what it does when its MLflow run is gone, and a crash that ends its run FAILED."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipgs.config import TrainConfig, load_config
from clipgs.errors import ConfigError
from tests.conftest import free_port
from tests.test_train import TINY, _env


def _with_a_truncated_shard(dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``dataset`` whose first training shard lost its last KiB: (copy, shard)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = sorted(broken.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-1024])
    return broken, shard


def test_preflight_mistakes_are_one_line_before_any_rank_starts(tiny_dataset, tmp_path, capsys):
    """What needs no ranks is checked in `clipgs train`'s own process: a missing dataset, an
    embedding width other than the teacher's, a stop_at the run has already passed; and
    option combinations the schedule or DeepSpeed cannot take are config errors."""
    from clipgs.cli import main
    from clipgs.train.checkpoint import MARKER

    out = tmp_path / "run"
    (out / "checkpoints" / "step0000006").mkdir(parents=True)
    (out / "checkpoints" / "step0000006" / MARKER).write_text("{}")
    base = [f"data={tiny_dataset}", f"output_dir={out}", *TINY]
    for extra, words in (([f"data={tmp_path}/nope"], "nope"),
                         (["model.embed_dim=128"], "model.embed_dim=128: the shards' teacher"),
                         (["stop_at=4"], "stop_at=4: the run's newest checkpoint is at step 6"),
                         (["offload_optimizer=true", "zero_stage=0"], "needs zero_stage >= 1"),
                         (["optim.min_lr=0.1", "optim.lr=0.01"], "min_lr=0.1 is above lr=0.01")):
        assert main(["train", "--nproc", "2", *base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (extra, err)
    # a Uni3D checkpoint: needs its size, is checked before a run starts, and is not read
    # again by a run that resumes (the checkpoint has the weights; the file may be gone)
    from clipgs.errors import StorageError
    from clipgs.train.trainer import preflight

    # a small lr alone still works: the default floor follows it
    assert load_config(TrainConfig, None, ["optim.lr=5e-6"]).optim.min_lr == pytest.approx(5e-8)
    # ... while a floor set to the default's value is the user's, and checked
    with pytest.raises(ConfigError, match="min_lr=1e-05 is above lr=5e-06"):
        load_config(TrainConfig, None, ["optim.lr=5e-6", "optim.min_lr=1e-5"])
    # a config that went through JSON (Prefect parameters, a checkpoint's) validates again
    cfg = load_config(TrainConfig, None, ["optim.lr=5e-6"])
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg
    cfg.optim.lr = 5e-9  # the derived floor is not the user's: it follows a later lr too
    assert cfg.optim.min_lr == pytest.approx(5e-11)
    with pytest.raises(ConfigError, match="init_from needs the Uni3D size"):
        load_config(TrainConfig, None, ["model.init_from=uni3d.pt"])
    uni3d = [f"data={tiny_dataset}", "model.size=tiny", f"model.init_from={tmp_path}/gone.pt"]
    with pytest.raises(StorageError, match="gone.pt: cannot read"):
        preflight(load_config(TrainConfig, None, uni3d + [f"output_dir={tmp_path}/new"]))
    assert preflight(load_config(TrainConfig, None, uni3d + [f"output_dir={out}"]))[1] == 6
    # a truncated training shard is named before any rank starts
    broken, shard = _with_a_truncated_shard(tiny_dataset, tmp_path)
    with pytest.raises(StorageError, match=f"{shard.name}: .* bytes; the manifest records"):
        preflight(load_config(TrainConfig, None, [f"data={broken}", f"output_dir={out}"]))


def test_resume_refuses_other_data_and_another_rank_count(tmp_path):
    """A checkpoint of a run on other training shards is refused; so is one written by
    another number of ranks under ZeRO >= 1 (DeepSpeed would fail deep inside its loader)."""
    import json

    import torch.distributed as dist

    from clipgs.train import checkpoint

    tag = tmp_path / checkpoint.tag_for(10)
    tag.mkdir()
    marker = {"step": 10, "samples_seen": 320, "fingerprint": "f", "teacher_sha256": "a" * 64,
              "data_identity": "d1", "tag": tag.name, "world_size": 1}
    (tag / checkpoint.MARKER).write_text(json.dumps(marker))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(ConfigError, match="a run on other training shards"):
            checkpoint.restore(None, tmp_path, 0, 0, None, "f", data_identity="d2")
        (tag / checkpoint.MARKER).write_text(json.dumps(dict(marker, world_size=4)))
        with pytest.raises(ConfigError, match="written by 4 ranks; ZeRO-2 partitions"):
            checkpoint.restore(None, tmp_path, 0, 0, None, "f", data_identity="d1",
                               zero_stage=2)
    finally:
        dist.destroy_process_group()


def test_resume_against_another_tracking_store_logs_to_a_new_run(tiny_dataset, tmp_path,
                                                                 monkeypatch):
    """The checkpoint's MLflow run is not in this store: training goes on in a new run that
    names the old one, instead of dying on "run not found"."""
    import mlflow
    import mlflow.tracking.fluent

    # the Tracker sets this process's active experiment (an id in this test's store): put
    # it back afterwards, as a training rank's process would simply exit
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id",
                        mlflow.tracking.fluent._active_experiment_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # set_experiment also exports it: undone
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")

    from clipgs.data.shards import read_manifest
    from clipgs.train.trainer import Tracker

    db = f"sqlite:///{tmp_path}/other.db"
    config = load_config(TrainConfig, None, [f"data={tiny_dataset}", "tracking.run_name=job-2",
                                             f"tracking.tracking_uri={db}",
                                             "tracking.system_metrics=false", *TINY])
    tracker = Tracker(config, read_manifest(str(tiny_dataset)), {}, 1, "ab" * 16, 2)
    try:
        run = mlflow.MlflowClient(db).get_run(tracker.run_id)
        assert tracker.run_id != "ab" * 16
        assert run.data.tags["clipgs.resumed_run_id"] == "ab" * 16
        assert run.data.tags["clipgs.run_name"] == "job-2"
    finally:
        tracker.metrics.close()
        mlflow.end_run()
    # a run of another experiment (tracking.experiment changed since) goes on where it is
    client = mlflow.MlflowClient(db)
    older = client.create_run(client.create_experiment("renamed")).info.run_id
    same = Tracker(config, read_manifest(str(tiny_dataset)), {}, 1, older, 4)
    try:
        assert same.run_id == older
    finally:
        same.metrics.close()
        mlflow.end_run()
    # a run deleted in the UI is still found, but cannot be re-opened: the same
    mlflow.MlflowClient(db).delete_run(tracker.run_id)
    again = Tracker(config, read_manifest(str(tiny_dataset)), {}, 1, tracker.run_id, 4)
    try:
        assert again.run_id != tracker.run_id
        assert mlflow.MlflowClient(db).get_run(again.run_id).data.tags[
            "clipgs.resumed_run_id"] == tracker.run_id
    finally:
        again.metrics.close()
        mlflow.end_run()


def test_resume_false_clears_the_earlier_runs_checkpoints(tmp_path):
    """Else a later resume could pick up the earlier run's newer checkpoint."""
    import torch.distributed as dist

    from clipgs.train.checkpoint import MARKER, clear, complete_steps

    ckpt, mirror = tmp_path / "checkpoints", tmp_path / "mirror"
    for root in (ckpt, mirror):
        (root / "step0000200").mkdir(parents=True)
        (root / "step0000200" / MARKER).write_text("{}")
    (mirror / "step0000300").mkdir()  # a copy a kill cut short: its shards would mix into
    (mirror / "step0000300" / "zero_pp_rank_3_optim_states.pt").write_text("")  # a new one
    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        clear(ckpt, 0, 0, str(mirror))
    finally:
        dist.destroy_process_group()
    assert not ckpt.exists() and complete_steps(str(mirror)) == []
    assert not list(mirror.iterdir())


def test_resume_refuses_a_checkpoint_trained_against_another_teacher(tmp_path):
    """The marker records the teacher; shards of another teacher never continue that run."""
    import json

    import torch.distributed as dist

    from clipgs.errors import TeacherMismatchError
    from clipgs.train import checkpoint

    tag = tmp_path / checkpoint.tag_for(10)
    tag.mkdir()
    (tag / checkpoint.MARKER).write_text(json.dumps({
        "step": 10, "samples_seen": 320, "fingerprint": "f", "teacher_sha256": "a" * 64,
        "tag": tag.name, "world_size": 1}))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(TeacherMismatchError, match="re-ingest with the run's teacher"):
            checkpoint.restore(None, tmp_path, 0, 0, None, "f", teacher_sha256="b" * 64)
    finally:
        dist.destroy_process_group()


class _RunsCode:
    """What a tampered checkpoint holds: unpickling it (weights_only=False) runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import shlex

        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_deepspeed_files_load_weights_only(tmp_path):
    """The plain types DeepSpeed stores load; anything else is refused, naming the file."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from clipgs.errors import StorageError
    from clipgs.train.checkpoint import load_weights_only

    state = {"loss_scaler": LossScaler(), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=6, start=0)}],
             "fp32": torch.ones(6)}
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_weights_only(str(tmp_path / "ok.pt"), map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and torch.equal(loaded["fp32"],
                                                                           state["fp32"])
    assert loaded["loss_scaler"].cur_scale == 1
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=6, start=0)
    marker = tmp_path / "pwned"
    torch.save(dict(state, extra=_RunsCode(marker)), tmp_path / "bad.pt")
    with pytest.raises(StorageError, match=r"bad\.pt: .*refused.*posix\.system"):
        load_weights_only(str(tmp_path / "bad.pt"))
    assert not marker.exists()
    assert LossScaler not in torch.serialization.get_safe_globals()  # only while loading
    # a truncated file: named, with the way out (the checkpoint before it)
    tag = tmp_path / "step0000004"
    tag.mkdir()
    (tag / "model.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:300])
    with pytest.raises(StorageError, match=r"model\.pt: not a readable checkpoint file .*"
                       r"remove step0000004 \(here and in the checkpoint_mirror\)"):
        load_weights_only(str(tag / "model.pt"))


def _on_rank0_worker(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: on_rank0 with a check that passes, then one that fails."""
    import json

    import torch.distributed as dist

    from clipgs.errors import StorageError
    from clipgs.train.distributed import DistInfo, on_rank0

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    info = DistInfo(rank, 2, rank, torch.device("cpu"), "gloo")
    calls = Path(out) / f"calls-{rank}"

    def check():
        calls.write_text("called")
        return {"splits": {"train": {"shards": [{"name": "train-000000.tar"}]}}}, 6

    def failing():
        raise StorageError("s3://b/d/train-000001.tar: missing; the manifest lists it")

    got = on_rank0(check, info)
    try:
        on_rank0(failing, info)
        error = None
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        error = f"{type(exc).__name__}: {exc}"
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"got": got, "error": error}))
    dist.destroy_process_group()


def test_preflight_under_a_launcher_is_made_by_rank_0_and_told_to_the_others(tmp_path):
    """Ranks started by torchrun or a Kubernetes Job check the shards once (on rank 0), not
    once a rank; rank 0's result reaches every rank, and so does its error - as one line that
    names the shard, not a rank left waiting."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_on_rank0_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    assert (tmp_path / "calls-0").exists() and not (tmp_path / "calls-1").exists()
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["got"] == r1["got"] == [{"splits": {"train": {"shards": [
        {"name": "train-000000.tar"}]}}}, 6]
    assert r0["error"] == "StorageError: s3://b/d/train-000001.tar: missing; the manifest lists it"
    assert r1["error"] == ("ClipgsError: rank 0 (StorageError): s3://b/d/train-000001.tar: "
                           "missing; the manifest lists it")


@pytest.mark.slow
def test_a_truncated_shard_under_torchrun_is_one_line_from_each_rank(tiny_dataset, tmp_path):
    """Two ranks started by torchrun (no `clipgs train` process before them) on a dataset
    with a truncated training shard: both exit with the shard named, neither hangs."""
    broken, shard = _with_a_truncated_shard(tiny_dataset, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "clipgs.train.trainer", f"data={broken}",
         f"output_dir={tmp_path}/train", *TINY], env=_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert f"rank 0: error: {shard}: " in log and "bytes; the manifest records" in log, log
    assert f"rank 1: error: rank 0 (StorageError): {shard}: " in log, log


@pytest.mark.slow
def test_resume_refuses_a_tampered_checkpoint_without_running_it(tiny_dataset, tmp_path):
    """A checkpoint fetched from the mirror is only as trusted as the bucket: a model-states
    file that would run code when unpickled stops the resume with an error naming it."""
    import shutil

    out, mirror, marker = tmp_path / "train", tmp_path / "mirror", tmp_path / "pwned"
    overrides = [f"data={tiny_dataset}", f"output_dir={out}", f"checkpoint_mirror={mirror}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *TINY]
    cmd = [sys.executable, "-m", "clipgs.cli", "train", "--nproc", "2", *overrides]
    subprocess.run(cmd + ["stop_at=2"], env=_env(), check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    tampered = mirror / "step0000002" / "mp_rank_00_model_states.pt"
    state = torch.load(tampered, weights_only=True)
    torch.save(dict(state, extra=_RunsCode(marker)), tampered)
    shutil.rmtree(out / "checkpoints")  # a new node: the resume fetches the mirror's copy
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert resumed.returncode != 0
    log = resumed.stdout + resumed.stderr
    # each rank's one line: "rank N: error: <file>: refused to load: ..."
    assert "error: " in log and "mp_rank_00_model_states.pt: refused" in log
    assert "posix.system" in log


@pytest.mark.slow
def test_a_training_that_crashes_is_a_failed_mlflow_run(tiny_dataset, tmp_path):
    """One real rank whose step 2 raises: its MLflow run ends FAILED with the error, not
    FINISHED (MLflow's exit hook ends a run left open as FINISHED)."""
    import subprocess
    import sys

    import mlflow

    db = f"sqlite:///{tmp_path}/mlflow.db"
    script = tmp_path / "crash.py"
    script.write_text(f"""
import os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT="{free_port()}")
from clipgs.train import trainer
calls = []
real = trainer._to_device
def crashing(*args):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected: the node lost its GPU")
    return real(*args)
trainer._to_device = crashing
sys.exit(trainer.main({[f"data={tiny_dataset}", f"output_dir={tmp_path / 'out'}",
                        f"tracking.tracking_uri={db}", "tracking.system_metrics=false",
                        *TINY]!r}))
""")
    proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "injected" in proc.stderr
    (run,) = mlflow.MlflowClient(db).search_runs(
        [mlflow.MlflowClient(db).get_experiment_by_name("clipgs").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["clipgs.error"] == "RuntimeError: injected: the node lost its GPU"
