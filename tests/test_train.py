"""Training: the typed config and the DeepSpeed config derived from it, the data stream, and
ZeRO 2 and 3 each on 2 real CPU ranks (gloo), stopped half-way and resumed - launched the ways
a cluster launches them: the deepspeed launcher (two "nodes" without ssh), torchrun with two
"nodes" on loopback, `clipgs train --nproc`. ZeRO 1 is tests/test_resume.py's kill test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipgs.config import TrainConfig, load_config
from clipgs.errors import ClipgsError, ConfigError
from clipgs.train.engine import deepspeed_config
from tests.conftest import free_port

TINY = ["micro_batch=4", "log_every=2", "checkpoint_every=2", "loader_workers=0",
        "model.depth=1", "model.width=48", "optim.warmup_steps=2", "steps=4"]


def test_config_overrides_and_clear_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nmodel:\n  depth: 2\n")
    cfg = load_config(TrainConfig, cfg_file, ["zero_stage=3", "optim.lr=0.01"])
    assert (cfg.steps, cfg.model.depth, cfg.zero_stage, cfg.optim.lr) == (7, 2, 3, 0.01)
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(TrainConfig, None, ["zero_stage=5"])
    with pytest.raises(ConfigError, match="modle"):
        load_config(TrainConfig, None, ["modle.depth=2"])
    with pytest.raises(ConfigError, match="grouping"):
        load_config(TrainConfig, None, ["grouping=gpu"])
    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 2 * cfg.micro_batch
    assert ds["optimizer"]["params"]["torch_adam"] and not ds["bf16"]["enabled"]
    assert ds["scheduler"]["params"]["total_num_steps"] == 7


def test_override_values_and_config_file_errors(tmp_path):
    """A text field takes an override as written (YAML would read 2024 as a number and cannot
    read @nightly); a broken YAML file, or one that is a list, is one line naming the file."""
    from clipgs.config import PipelineConfig

    for raw in ("2024", "@nightly", "true"):
        assert load_config(TrainConfig, None, [f"tracking.run_name={raw}"]).tracking.run_name \
            == raw
    assert load_config(PipelineConfig, None, ["train.tracking.run_name=2024"]).train.tracking \
        .run_name == "2024"
    cfg = load_config(TrainConfig, None, ["tracking.run_name='7'", "steps=9"])
    assert (cfg.tracking.run_name, cfg.steps) == ("7", 9)  # quotes still unwrap; ints parse
    assert load_config(TrainConfig, None, ["tracking.run_name=null"]).tracking.run_name is None
    with pytest.raises(ConfigError, match="override steps=@9: not a YAML value"):
        load_config(TrainConfig, None, ["steps=@9"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- steps: 7\n")
    with pytest.raises(ConfigError, match="list.yaml: the config is a YAML list; expected a "
                       "mapping"):
        load_config(TrainConfig, listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 7\nmodel:\n  depth: [2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line 4") as exc:
        load_config(TrainConfig, broken)
    assert "\n" not in str(exc.value)


def test_deepspeed_config_precision_offload_accumulation():
    cfg = load_config(TrainConfig, None, ["zero_stage=2", "offload_optimizer=true",
                                          "grad_accum=4", "micro_batch=8"])
    gpu = deepspeed_config(cfg, world_size=16, on_gpu=True)
    assert gpu["bf16"]["enabled"] and not gpu["optimizer"]["params"]["torch_adam"]
    assert gpu["train_batch_size"] == 8 * 4 * 16 and gpu["gradient_accumulation_steps"] == 4
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    cpu = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert not cpu["bf16"]["enabled"] and cpu["zero_force_ds_cpu_optimizer"] is False
    cfg.precision = "bf16"
    assert deepspeed_config(cfg, 2, on_gpu=False)["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="offload_optimizer.*zero_stage"):
        deepspeed_config(load_config(TrainConfig, None, ["offload_optimizer=true",
                                                         "zero_stage=0"]), 1, False)


def test_no_weight_decay_on_embeddings_tokens_norms_and_biases():
    from clipgs.train.engine import param_groups
    from clipgs.train.trainer import TrainModule

    module = TrainModule(load_config(TrainConfig, None, ["model.depth=1", "model.width=48"]),
                         384)
    names = {id(p): n for n, p in module.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(module, 0.05))
    assert {"encoder.seq_embed", "encoder.order_embed", "encoder.cls_token"} <= no_decay
    assert all(not n.endswith((".bias", "_embed", "token")) for n in decay)
    assert any(n.endswith("attn.qkv.weight") for n in decay)


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_activation_checkpointing_keeps_names_and_gradients(drop_path):
    """Also with stochastic depth: the recomputation in the backward pass replays the forward's
    random draws (torch.utils.checkpoint keeps the RNG state), so it drops the same branches."""
    from clipgs.config import ModelConfig
    from clipgs.models.encoder import GSEncoder
    from clipgs.train.engine import checkpoint_blocks

    torch.manual_seed(0)
    cfg = ModelConfig(width=48, depth=2, heads=3, groups=8, group_size=8, drop_path=drop_path)
    plain, wrapped = GSEncoder(cfg, 32), GSEncoder(cfg, 32)
    wrapped.load_state_dict(plain.state_dict())
    assert checkpoint_blocks(wrapped) == 2
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    patches, centres = torch.randn(8, 8, 8, 14), torch.randn(8, 8, 3)
    for m in (plain, wrapped):
        torch.manual_seed(1)
        m(patches, centres).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def _batches(urls, cfg, rank, start_step, n):
    from clipgs.data.loader import train_loader

    it = iter(train_loader(urls, cfg, rank, 2, start_step=start_step))
    return [next(it) for _ in range(n)]


def test_stream_is_split_by_rank_and_reseeded_from_the_step(tiny_dataset):
    from clipgs.data.shards import read_manifest, shard_urls

    urls = shard_urls(str(tiny_dataset), read_manifest(str(tiny_dataset)), "train")
    cfg = load_config(TrainConfig, None, ["micro_batch=4", "loader_workers=0",
                                          "model.groups=8", "model.group_size=8"])
    a, again = _batches(urls, cfg, 0, 0, 3), _batches(urls, cfg, 0, 0, 3)
    assert all(torch.equal(x["centres"], y["centres"]) for x, y in zip(a, again))  # reproducible
    other_rank = _batches(urls, cfg, 1, 0, 3)
    resumed = _batches(urls, cfg, 0, 10, 3)
    assert not all(torch.equal(x["centres"], y["centres"]) for x, y in zip(a, other_rank))
    assert not all(torch.equal(x["centres"], y["centres"]) for x, y in zip(a, resumed))
    assert a[0]["patches"].shape == (4, 8, 8, 14) and a[0]["centres"].shape == (4, 8, 3)

    # split: every epoch, each rank reads its own shards, and the stream goes on past it
    from clipgs.data.loader import SplitShards

    shards = [f"s{i}" for i in range(6)]
    per_rank = [[d["url"] for _, d in zip(range(6), SplitShards(shards, "e", r, 2))]
                for r in (0, 1)]
    for epoch in (slice(0, 3), slice(3, 6)):
        assert sorted(per_rank[0][epoch] + per_rank[1][epoch]) == shards
    assert per_rank[0][:3] != per_rank[0][3:]  # a new permutation each epoch
    # shards that do not divide evenly: an epoch still reads every one (9 on 2 readers)
    odd = [f"s{i}" for i in range(9)]
    first = [[d["url"] for _, d in zip(range(n), SplitShards(odd, "e", r, 2))]
             for r, n in ((0, 5), (1, 4))]
    assert sorted(first[0] + first[1]) == odd
    cfg.data_mode = "split"
    assert _batches(urls, cfg, 1, 0, 4)[3]["patches"].shape[0] == 4  # 16 samples > 1 shard
    with pytest.raises(ConfigError, match="data_mode=split: 2 training shards for 4 readers"):
        next(iter(SplitShards(urls, "s", 0, 4)))
    # no shard readable (deleted, no credentials): an error, not a loader spinning for ever
    from clipgs.errors import StorageError

    for mode in ("resampled", "split"):
        cfg.data_mode = mode
        gone = [u.replace(".tar", "-gone.tar") for u in urls]
        with pytest.raises(StorageError, match="shard reads failed in a row, none readable"):
            _batches(gone, cfg, 0, 0, 1)


def test_grouping_on_the_device_gives_the_model_input(tiny_dataset):
    from clipgs.data.loader import group_on_device
    from clipgs.data.shards import read_manifest, shard_urls

    urls = shard_urls(str(tiny_dataset), read_manifest(str(tiny_dataset)), "train")
    cfg = load_config(TrainConfig, None, ["micro_batch=4", "loader_workers=0", "grouping=device",
                                          "model.groups=8", "model.group_size=8"])
    raw = _batches(urls, cfg, 0, 0, 1)[0]
    assert raw["gaussians"].shape[0] == 4 and "patches" not in raw
    objects = raw["gaussians"].numpy().copy()
    grouped = group_on_device(raw, 8, 8)
    assert grouped["patches"].shape == (4, 8, 8, 14) and grouped["centres"].shape == (4, 8, 3)
    # the groups the package (and evaluation, and serving) make of the same objects
    from clipgs.models.tokenizer import group_numpy

    for i, obj in enumerate(objects):
        patches, centres = group_numpy(obj, 8, 8)
        np.testing.assert_allclose(grouped["centres"][i].numpy(), centres, atol=1e-6)
        np.testing.assert_allclose(np.sort(grouped["patches"][i].numpy().reshape(8, -1), 1),
                                   np.sort(patches.reshape(8, -1), 1), atol=1e-6)


def test_rng_states_round_trip_through_json():
    import random

    from clipgs.train.checkpoint import rng_state, set_rng_state

    state = json.loads(json.dumps(rng_state()))
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_only_checkpoints_with_a_marker_count(tmp_path):
    from clipgs.train.checkpoint import MARKER, complete_steps, prune

    for step, done in ((2, True), (4, True), (6, False), (8, True)):
        (tmp_path / f"step{step:07d}").mkdir()
        if done:
            (tmp_path / f"step{step:07d}" / MARKER).write_text("{}")
    assert complete_steps(str(tmp_path)) == [2, 4, 8]  # step 6 was cut short by a kill
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000004", "step0000006",
                                                          "step0000008"]


# ---- ZeRO 1, 2, 3 on two CPU ranks, stopped half-way and resumed ---------------------------

def expected_lr(cfg: TrainConfig, step: int) -> float:
    """The LR update ``step`` of an uninterrupted run runs at: DeepSpeed's WarmupCosineLR at
    iteration ``step`` (linear warm-up step/W, no update at LR 0)."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = WarmupCosineLR(opt, total_num_steps=cfg.steps, warmup_num_steps=cfg.optim.warmup_steps,
                           warmup_type="linear", cos_min_ratio=cfg.optim.min_lr / cfg.optim.lr)
    sched.step(step)
    return sched.get_last_lr()[0]


def check_resumed(out: Path, db: str, overrides: list[str], resumed_from: int = 2) -> dict:
    """Same final step and samples as an uninterrupted run; one MLflow run across both jobs,
    its metrics at every logged step; the LR schedule continued, not restarted."""
    from mlflow import MlflowClient

    result = json.loads((out / "train_result.json").read_text())
    cfg = load_config(TrainConfig, None, overrides)
    logged = list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    assert (result["status"], result["step"]) == ("complete", cfg.steps)
    assert result["resumed_from"] == resumed_from
    assert result["samples_seen"] == cfg.steps * cfg.micro_batch * 2
    client = MlflowClient(db)
    # steps between the last checkpoint and a kill are trained (and logged) twice
    loss = client.get_metric_history(result["run_id"], "loss")
    assert sorted({m.step for m in loss}) == logged and all(np.isfinite(m.value) for m in loss)
    lr = {m.step: m.value for m in client.get_metric_history(result["run_id"], "lr")}
    assert [lr[s] for s in logged] == pytest.approx([expected_lr(cfg, s) for s in logged])
    assert lr[logged[0]] > 0 and lr[cfg.steps] == pytest.approx(cfg.optim.min_lr)
    seen = {m.step: m.value for m in client.get_metric_history(result["run_id"], "samples_seen")}
    assert [seen[s] for s in logged] == [s * cfg.micro_batch * 2 for s in logged]
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["clipgs.resumed_from_step"] == str(resumed_from)
    assert run.data.tags["clipgs.dataset_manifest_sha256"] and run.data.tags["clipgs.git_commit"]
    assert json.loads(run.data.tags["clipgs.config"])["zero_stage"] == cfg.zero_stage
    return result


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))


def _run_nodes(cmds: list[list[str]], timeout: int = 300) -> None:
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


@pytest.mark.slow
def test_zero2_offload_deepspeed_launcher_then_torchrun_two_nodes(tiny_dataset, tmp_path):
    """Job 1: the deepspeed launcher, two nodes of one rank each (--no_ssh, as each node of a
    cluster starts it); job 2: torchrun with two nodes, from the standard environment."""
    db, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "train"
    mirror = tmp_path / "mirror"  # the nodes share output_dir's disk: rank 0 copies it all
    overrides = [f"data={tiny_dataset}", f"output_dir={out}", "zero_stage=2",
                 "offload_optimizer=true", f"tracking.tracking_uri={db}",
                 f"checkpoint_mirror={mirror}", *TINY]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    bin_ = Path(sys.executable).parent
    _run_nodes([[str(bin_ / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                 "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "--module", "clipgs.train.trainer", *overrides, "stop_at=2"] for n in (0, 1)])
    assert json.loads((out / "train_result.json").read_text())["status"] == "stopped"
    port = free_port()
    _run_nodes([[sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 "--nproc_per_node=1", f"--node_rank={n}", "--master_addr=127.0.0.1",
                 f"--master_port={port}", "-m", "clipgs.train.trainer", *overrides]
                for n in (0, 1)])
    check_resumed(out, db, overrides)
    from clipgs.train.checkpoint import COPIED, complete_steps
    assert complete_steps(str(mirror)) == [2, 4]  # keep_checkpoints=2
    assert not (mirror / "step0000004" / COPIED).exists()  # node 1 saw rank 0's disk
    shards = sorted(p.name for p in (mirror / "step0000004").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards

    # another model into the same output_dir: refused with a clear error, not half-loaded
    other = subprocess.run([sys.executable, "-m", "clipgs.cli", "train", "--nproc", "2",
                            *overrides, "model.width=96"], env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert other.returncode != 0
    assert "a checkpoint of a run with another model" in other.stdout + other.stderr


@pytest.mark.slow
def test_two_nodes_with_their_own_disks_copy_to_one_mirror_and_resume_from_it(tiny_dataset,
                                                                             tmp_path):
    """Each node its own output_dir (its own disk): each copies its rank's shards, rank 0
    writes the marker once node 1's .clipgs_copied object is there, and job 2 resumes from
    the mirror's checkpoint (node 1 has no marker of its own), ending as an uninterrupted
    run would."""
    from clipgs.train.checkpoint import COPIED, MARKER, complete_steps

    db, mirror = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "mirror"
    outs = [tmp_path / "node0", tmp_path / "node1"]
    common = [f"data={tiny_dataset}", "zero_stage=1", f"tracking.tracking_uri={db}",
              f"checkpoint_mirror={mirror}", *TINY]
    for job in ([*common, "stop_at=2"], common):
        port = free_port()
        _run_nodes([[sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                     "--nproc_per_node=1", f"--node_rank={n}", "--master_addr=127.0.0.1",
                     f"--master_port={port}", "-m", "clipgs.train.trainer",
                     f"output_dir={outs[n]}", *job] for n in (0, 1)])
    check_resumed(outs[0], db, [f"output_dir={outs[0]}", *common])
    assert complete_steps(str(mirror)) == [2, 4]
    for step in ("step0000002", "step0000004"):
        assert (mirror / step / COPIED / "rank1").exists()
        shards = sorted(p.name for p in (mirror / step).glob("*optim_states.pt"))
        assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    assert not (outs[1] / "checkpoints" / "step0000004" / MARKER).exists()  # rank 0's only
    assert (outs[1] / "checkpoints" / "step0000002" / MARKER).exists()  # fetched for job 2


@pytest.mark.slow
def test_zero3_from_s3_resumes_from_the_mirror(tiny_dataset, tmp_path, s3_server):
    """Shards streamed from S3, checkpoints mirrored to S3; the local checkpoints are wiped
    between the jobs (a new node), so job 2 resumes from the mirror. The exported package is
    DeepSpeed's own fp32 consolidation (zero_to_fp32) of the final ZeRO-3 checkpoint."""
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from clipgs.cli import main
    from clipgs.data import storage

    data = f"{s3_server}/shards"
    for f in Path(tiny_dataset).iterdir():
        storage.write_bytes(f"{data}/{f.name}", f.read_bytes())
    db, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "train"
    overrides = [f"data={data}", f"output_dir={out}", "zero_stage=3",
                 "activation_checkpointing=true", f"checkpoint_mirror={s3_server}/ckpt",
                 "keep_checkpoints=1", *TINY, "log_every=1"]  # the first resumed step too
    # named as the Kubernetes flow names each Job's run: job 2 re-opens job 1's run
    assert main(["train", "--nproc", "2", "--tracking-uri", db, *overrides, "stop_at=2",
                 "tracking.run_name=job-1"]) == 0
    shutil.rmtree(out / "checkpoints")
    assert main(["train", "--nproc", "2", "--tracking-uri", db, *overrides,
                 "tracking.run_name=job-2"]) == 0
    result = check_resumed(out, db, overrides)
    from flows.kube import training_result
    assert training_result(db, "clipgs", "job-2")["run_id"] == result["run_id"]
    with pytest.raises(ClipgsError, match="no finished run named job-1"):
        training_result(db, "clipgs", "job-1")
    mirrored = {u.split("/ckpt/")[1] for u in storage.list_files(f"{s3_server}/ckpt")}
    assert "step0000004/clipgs_checkpoint.json" in mirrored
    assert not any(m.startswith("step0000002/") for m in mirrored)  # pruned: keep 1
    # how long the steps stood still for each checkpoint, and each copy's own time
    from mlflow import MlflowClient
    client = MlflowClient(db)
    for name in ("checkpoint_s", "checkpoint_mirror_s"):
        history = client.get_metric_history(result["run_id"], name)
        assert sorted(m.step for m in history) == [2, 4], name
        assert all(m.value > 0 for m in history), name

    reference = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"),
                                                         tag="step0000004")
    package = load_file(f"{result['package']}/encoder.safetensors")
    assert package and set(package) <= set(reference)
    for name, tensor in package.items():
        if tensor.is_floating_point() and "running_" not in name:
            assert torch.allclose(tensor, reference[name].float()), name
