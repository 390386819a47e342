import json

import pytest

from clipgs.config import TrainConfig, load_config
from clipgs.errors import ConfigError
from clipgs.train.trainer import deepspeed_config


def test_config_overrides_and_clear_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nmodel:\n  depth: 2\n")
    cfg = load_config(TrainConfig, cfg_file, ["zero_stage=3", "optim.lr=0.01"])
    assert (cfg.steps, cfg.model.depth, cfg.zero_stage, cfg.optim.lr) == (7, 2, 3, 0.01)
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(TrainConfig, None, ["zero_stage=5"])
    with pytest.raises(ConfigError, match="modle"):
        load_config(TrainConfig, None, ["modle.depth=2"])
    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 2 * cfg.micro_batch
    assert ds["optimizer"]["params"]["torch_adam"] and not ds["bf16"]["enabled"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_two_cpu_ranks_train_with_deepspeed(tiny_dataset, tmp_path, stage):
    import mlflow

    from clipgs.cli import main
    from clipgs.models.package import load_package

    db = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "train"
    assert main(["train", "--nproc", "2", "--tracking-uri", db, f"data={tiny_dataset}",
                 f"output_dir={out}", "steps=4", "micro_batch=4", "log_every=2",
                 "checkpoint_every=2", f"zero_stage={stage}", "loader_workers=0",
                 "model.depth=1", "model.width=48"]) == 0
    result = json.loads((out / "train_result.json").read_text())
    assert result["samples_seen"] == 4 * 4 * 2
    assert (out / "checkpoints" / "step0000004").is_dir()
    package = load_package(result["package"])
    assert package.meta["model"]["depth"] == 1
    mlflow.set_tracking_uri(db)
    run = mlflow.get_run(result["run_id"])
    assert run.data.params["zero_stage"] == str(stage)
    assert "loss" in run.data.metrics and run.data.tags["clipgs.dataset_manifest_sha256"]
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "loss")
    assert [m.step for m in history] == [2, 4]
