"""One training run with DeepSpeed ZeRO, top to bottom: config, ranks, engine, resume, data,
the loop (step, log, checkpoint), then the fp32 model package and its MLflow run.

Each rank runs ``main(argv)``; ``clipgs train --nproc N`` spawns N local ranks through torchrun,
and under torchrun / the deepspeed launcher / a Kubernetes indexed Job it runs as one rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from clipgs.config import TrainConfig, flatten, load_config, to_yaml
from clipgs.data import storage
from clipgs.data.loader import group_on_device, train_loader
from clipgs.data.shards import (check_shards, manifest_checksum, read_manifest, shard_urls,
                                training_data_identity)
from clipgs.errors import ClipgsError, ConfigError, StorageError
from clipgs.models.encoder import build_encoder
from clipgs.models.package import save_package
from clipgs.train import checkpoint, distributed
from clipgs.train.mirror import MirrorCopy
from clipgs.train.engine import (bf16_buffers, checkpoint_blocks, deepspeed_config,
                                 param_groups, use_bf16)
from clipgs.train.loss import ClipGSLoss, capped_log_scale

log = logging.getLogger("clipgs.train")
RESULT = "train_result.json"


class TrainModule(nn.Module):
    """Encoder, learnable logit scale and loss in one module, so that under ZeRO-3 every
    parameter is gathered inside ``forward``."""

    def __init__(self, config: TrainConfig, embed_dim: int, init: bool = True):
        super().__init__()
        self.encoder = build_encoder(config.model, embed_dim, init)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(config.loss.logit_scale_init)))
        self.loss = ClipGSLoss(config.loss)
        self.max_log_scale = math.log(config.loss.logit_scale_max)
        if config.activation_checkpointing:
            checkpoint_blocks(self.encoder)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.encoder(batch["patches"], batch["centres"])
        scale = capped_log_scale(self.logit_scale, self.max_log_scale).exp()[0]
        out = self.loss(g, batch["txt"], batch["img"], scale)
        out["logit_scale"] = scale.detach()
        return out


def preflight(config: TrainConfig) -> tuple[dict, int]:
    """The checks that need no ranks, made before any are started (``clipgs train`` runs them
    in its own process, so a mistake is one line, not a traceback from every rank): the output
    folder, the dataset's manifest and training shards (there, whole), the embedding width
    against the teacher's, ``stop_at`` against the newest checkpoint, the Uni3D checkpoint of a
    run that starts. Returns the manifest and the newest checkpoint's step (0: none). Under
    another launcher (torchrun, a Kubernetes indexed Job) rank 0 makes them and tells the
    other ranks (``distributed.on_rank0``): one listing of the shards, not one a rank."""
    if storage.is_s3(config.output_dir):
        raise ConfigError(f"output_dir={config.output_dir!r}: checkpoints are written to local "
                          "disk first; give a local folder and checkpoint_mirror=s3://...")
    manifest = read_manifest(config.data)
    if not shard_urls(config.data, manifest, "train"):
        raise StorageError(f"{config.data}: no training shards in the manifest")
    check_shards(config.data, manifest, "train")  # a missing or truncated shard, named
    if config.model.embed_dim and config.model.embed_dim != manifest["embed_dim"]:
        raise ConfigError(f"model.embed_dim={config.model.embed_dim}: the shards' teacher "
                          f"embeds in {manifest['embed_dim']} dimensions, and the 3D embedding "
                          "is trained against it; leave model.embed_dim unset")
    newest = 0
    if config.resume:
        ckpt_dir = str(Path(config.output_dir) / "checkpoints")
        newest = max(checkpoint.complete_steps(ckpt_dir) + (checkpoint.complete_steps(
            config.checkpoint_mirror) if config.checkpoint_mirror else []), default=0)
    if config.stop_at and newest >= config.stop_at:
        raise ConfigError(f"stop_at={config.stop_at}: the run's newest checkpoint is at "
                          f"step {newest} already; give a later stop_at, or none to "
                          "finish the run")
    if config.model.init_from and not newest:  # read by every rank: missing, say so once
        storage.size(config.model.init_from)
    return manifest, newest


def run(config: TrainConfig) -> dict:
    import deepspeed

    dist_info = distributed.setup()
    manifest, newest = distributed.on_rank0(lambda: preflight(config), dist_info)
    rank, is_main = dist_info.rank, dist_info.is_main
    urls = shard_urls(config.data, manifest, "train")
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embed_dim = config.model.embed_dim or manifest["embed_dim"]
    ckpt_dir = out_dir / "checkpoints"
    mirror = MirrorCopy(
        config.checkpoint_mirror, ckpt_dir, rank, dist_info.local_rank,
        config.keep_checkpoints, dist_info.device, config.checkpoint_mirror_background,
    ) if config.checkpoint_mirror else None
    if mirror is not None and mirror.several and config.resume:  # only the mirror's
        newest = distributed.on_rank0(lambda: max(checkpoint.complete_steps(  # are on
            config.checkpoint_mirror), default=0), dist_info)  # every node
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    module = TrainModule(config, embed_dim, init=not newest)  # a resume loads its own
    on_gpu = dist_info.device.type == "cuda"
    bf16 = use_bf16(config, on_gpu)
    ds_config = deepspeed_config(config, dist_info.world_size, on_gpu)
    if bf16:
        bf16_buffers(module)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, config.optim.weight_decay),
        config=ds_config)

    # resume: model, optimizer, LR schedule, RNGs; the data position is the step
    fingerprint = run_fingerprint(config)
    data_identity = training_data_identity(manifest)
    marker = None
    if config.resume:
        marker = checkpoint.restore(engine, ckpt_dir, rank, dist_info.local_rank,
                                    config.checkpoint_mirror, fingerprint,
                                    teacher_sha256=manifest["teacher"]["sha256"],
                                    data_identity=data_identity, zero_stage=config.zero_stage,
                                    mirror_only=bool(mirror and mirror.several))
    else:
        checkpoint.clear(ckpt_dir, rank, dist_info.local_rank, config.checkpoint_mirror)
        if is_main:  # nor is the earlier run's model left to look like this run's
            shutil.rmtree(out_dir / "package", ignore_errors=True)
    if marker is not None:  # DeepSpeed restores the iteration, not the LR it caches: refresh
        scheduler.step(scheduler.last_batch_iteration)
    if marker is None:
        torch.manual_seed(config.seed + 1 + rank)  # per-rank draws (random views, dropout)
        # DeepSpeed's WarmupCosineLR starts at iteration -1 (LR 0) and steps after each update,
        # so the first two updates would run at LR 0 and the schedule one step late: start it
        # at iteration 1, so update k runs at iteration k (warm-up k/W, min_lr by the end)
        scheduler.step(1)
    if marker is not None and mirror is not None:  # a checkpoint whose copy failed or was
        mirror.ensure(marker["step"])  # cut short is copied now (waited for below)
    start = marker["step"] if marker else 0
    saved: set[int] = set()  # the checkpoints this job wrote (pruning on nodes without markers)
    seen = marker["samples_seen"] if marker else 0
    end = min(config.steps, config.stop_at or config.steps)

    try:
        tracker = Tracker(config, manifest, ds_config, dist_info.world_size,
                          marker.get("run_id") if marker else None, start) if is_main else None
    except Exception as exc:  # MLflow down or refusing: one line, before any training
        if isinstance(exc, ClipgsError):
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ClipgsError(f"MLflow at {config.tracking.tracking_uri}: cannot open the "
                          f"training run ({first[:300]})") from None
    try:
        loader = iter(train_loader(urls, config, rank, dist_info.world_size, start_step=start))
        samples_per_step = config.micro_batch * config.grad_accum * dist_info.world_size
        t0, window_start, window_steps, data_wait = time.time(), time.perf_counter(), 0, 0.0
        for step in range(start + 1, end + 1):
            lr = scheduler.get_last_lr()[0]  # the LR this update runs at (it steps after)
            for _ in range(config.grad_accum):
                t = time.perf_counter()
                batch = next(loader)
                data_wait += time.perf_counter() - t
                out = engine(_to_device(batch, config, dist_info.device, bf16))
                engine.backward(out["loss"])
                engine.step()
            seen += samples_per_step
            window_steps += 1
            if is_main and (step % config.log_every == 0 or step == end):
                elapsed = time.perf_counter() - window_start
                metrics = {k: float(v.detach()) for k, v in out.items()}
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:  # ZeRO-0 in fp32 does not keep it: not logged as 0
                    metrics["grad_norm"] = float(grad_norm)
                metrics.update(lr=lr,
                               samples_per_s=samples_per_step * window_steps / max(elapsed, 1e-9),
                               data_wait_frac=data_wait / max(elapsed, 1e-9),
                               samples_seen=seen, **_memory(dist_info.device))
                tracker.log(metrics, step)
                log.info("step %d/%d loss %.4f (text %.4f image %.4f) lr %.2e %.1f samples/s, "
                         "%.0f%% waiting for data", step, config.steps, metrics["loss"],
                         metrics["loss_text"], metrics["loss_image"], metrics["lr"],
                         metrics["samples_per_s"], 100 * metrics["data_wait_frac"])
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if step % config.checkpoint_every == 0 or step == end:
                t = time.perf_counter()
                checkpoint.save(engine, ckpt_dir, step, {
                    "step": step, "samples_seen": seen, "fingerprint": fingerprint,
                    "teacher_sha256": manifest["teacher"]["sha256"], "data_identity": data_identity,
                    "run_id": tracker.run_id if tracker else None},
                    rank, dist_info.local_rank, config.keep_checkpoints, mirror, saved)
                if is_main:  # how long training stood still for it, a wait for the copy
                    # before included
                    tracker.log({"checkpoint_s": time.perf_counter() - t}, step)
                    _log_copy(tracker, mirror)
        if mirror:  # the job ends only once its last checkpoint is in the mirror
            mirror.wait()
            if is_main:
                _log_copy(tracker, mirror)

        result = {}
        common = {"steps": config.steps, "step": end, "samples_seen": seen,
                  "resumed_from": start if marker else None,
                  "tracking_uri": config.tracking.tracking_uri}
        if end < config.steps:  # stop_at: a job of a longer run; the next job resumes
            if is_main:
                run_id = tracker.stop(end)
                result = dict(common, status="stopped", run_id=run_id, package=None,
                              final_loss=None)
        else:
            state = checkpoint.export_fp32(engine)  # a collective: every rank takes part
            if is_main:
                encoder_state = {k: v for k, v in state.items() if k.startswith("encoder.")}
                meta = {"model": config.model.model_dump(mode="json"), "embed_dim": embed_dim,
                        "points": manifest["config"]["points"], "teacher": manifest["teacher"],
                        "dataset_manifest_sha256": manifest_checksum(manifest),
                        "training_run_id": tracker.run_id,
                        # the scale training used: the parameter may sit above the cap
                        "logit_scale": float(state["logit_scale"].exp()[0].clamp(
                            max=config.loss.logit_scale_max))}
                package = save_package(out_dir / "package", encoder_state, meta)
                final_loss = tracker.finish(package, time.time() - t0)
                result = dict(common, status="complete", run_id=tracker.run_id,
                              package=str(package), final_loss=final_loss)
    except BaseException as exc:  # MLflow's exit hook would mark the run FINISHED
        if tracker is not None:
            tracker.fail(exc)
        raise
    if is_main:
        storage.write_bytes(str(out_dir / RESULT), json.dumps(result, indent=1).encode())
    torch.distributed.barrier()
    return result


def _log_copy(tracker: Tracker, mirror: MirrorCopy | None) -> None:
    """The mirror copy's own wall time, at the step it copied."""
    finished = mirror.pop_finished() if mirror else None
    if finished:
        tracker.log({"checkpoint_mirror_s": finished[1]}, finished[0])


def run_fingerprint(config: TrainConfig) -> str:
    """What a checkpoint must share with the run that resumes it (not stop_at, workers, ...)."""
    keys = ("model", "loss", "optim", "steps", "micro_batch", "grad_accum", "zero_stage",
            "seed", "precision")
    return hashlib.sha256(json.dumps(config.model_dump(mode="json", include=set(keys)),
                                     sort_keys=True).encode()).hexdigest()


def _to_device(batch: dict[str, torch.Tensor], config: TrainConfig, device: torch.device,
               bf16: bool) -> dict[str, torch.Tensor]:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch = group_on_device(batch, config.model.groups, config.model.group_size)
    if bf16:  # grouping above runs in fp32: FPS distances need the precision
        batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                 for k, v in batch.items()}
    return batch


def _memory(device: torch.device) -> dict[str, float]:
    import psutil

    out = {"mem_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":
        out["gpu_mem_alloc_gb"] = torch.cuda.memory_allocated(device) / 2**30
        out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:  # a deleted run (still there, lifecycle "deleted") cannot be re-opened either
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


class Tracker:
    """Rank 0's MLflow run: started (or, on resume, re-opened) with the config, the DeepSpeed
    config and the tags (git commit, dataset manifest checksum, config); metrics through a
    bounded buffer that outlives a tracking server outage; the package and loss curve at the
    end. Nothing here may stop training: failures at the end leave the local result intact."""

    def __init__(self, config: TrainConfig, manifest: dict, ds_config: dict, world_size: int,
                 run_id: str | None, start_step: int):
        from clipgs.tracking import (RUN_NAME_TAG, BufferedMetrics, git_commit, resume_run,
                                     setup_mlflow)

        self.config = config
        self.mlflow = mlflow = setup_mlflow(config.tracking.tracking_uri,
                                            config.tracking.experiment)
        earlier = None
        if run_id is not None and not _run_exists(run_id):
            # resumed against another tracking store (or the run was deleted): training goes
            # on in a new run that names the checkpoint's
            log.warning("the checkpoint's MLflow run %s is not in %s; logging to a new run",
                        run_id, config.tracking.tracking_uri)
            earlier, run_id = run_id, None
        # a resumed run goes on in its own experiment (tracking.experiment names new runs')
        active = (resume_run(run_id, log_system_metrics=config.tracking.system_metrics)
                  if run_id else
                  mlflow.start_run(run_name=config.tracking.run_name,
                                   log_system_metrics=config.tracking.system_metrics))
        if earlier:
            mlflow.set_tag("clipgs.resumed_run_id", earlier)
        self.run_id = active.info.run_id
        config_yaml = to_yaml(config)
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(config.model_dump()).items()})
            mlflow.log_text(config_yaml, "config.yaml")
            mlflow.log_dict(ds_config, "deepspeed_config.json")
        else:  # params are immutable in MLflow: a resumed job's config goes beside them
            mlflow.log_text(config_yaml, f"config-resumed-step{start_step}.yaml")
        mlflow.set_tags({
            "clipgs.stage": "train", "clipgs.git_commit": git_commit(),
            "clipgs.dataset": config.data,
            "clipgs.dataset_manifest_sha256": manifest_checksum(manifest),
            "clipgs.teacher_sha256": manifest["teacher"]["sha256"],
            "clipgs.config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
            "clipgs.config": json.dumps(config.model_dump(mode="json"))[:5000],
            "clipgs.world_size": str(world_size), "clipgs.resumed_from_step": str(start_step)})
        if config.tracking.run_name:  # a resumed run keeps its first name: this tag is the
            # latest launch's, which is how a Kubernetes training flow finds its run
            mlflow.set_tag(RUN_NAME_TAG, config.tracking.run_name)
        log.info("config:\n%s", config_yaml)
        log.info("deepspeed config: %s", json.dumps(ds_config))
        self.metrics = BufferedMetrics(self.run_id, config.tracking.tracking_uri,
                                       config.tracking.buffer_size)
        self.losses: dict[int, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "loss" in metrics:  # not in the checkpoint timings
            self.losses[step] = metrics["loss"]
        self.metrics.log(metrics, step)

    def fail(self, exc: BaseException) -> None:
        """The run ends FAILED with the error as a tag: left open, MLflow's exit hook would
        end it FINISHED, and a crashed training would look complete."""
        self._quietly(lambda: (self.mlflow.set_tag("clipgs.error", f"{type(exc).__name__}: "
                                                   f"{exc}"[:500]),
                               self.mlflow.end_run("FAILED")))
        self.metrics.close(10)

    def stop(self, step: int) -> str:
        self.metrics.close(60)
        self._quietly(lambda: (self.mlflow.set_tag("clipgs.stopped_at_step", str(step)),
                               self.mlflow.end_run("KILLED")))
        return self.run_id

    def finish(self, package: Path, train_time: float) -> float | None:
        self.metrics.close(120)
        final = [self.losses[max(self.losses)]] if self.losses else [None]

        def end():
            mlflow = self.mlflow
            mlflow.log_artifacts(str(package), "package")
            history = sorted((m.step, m.value) for m in
                             mlflow.MlflowClient().get_metric_history(self.run_id, "loss"))
            if final[0] is None and history:  # a job resumed at the last step trains nothing
                final[0] = history[-1][1]
            # samples_seen is already a per-step metric: its last value is the run's total
            mlflow.log_metrics({"final_loss": final[0] if final[0] is not None
                                else float("nan"), "train_time_s": train_time})
            _log_loss_curve(mlflow, history)
            mlflow.end_run()

        self._quietly(end)
        return final[0]

    def _quietly(self, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the trained model on disk is what matters
            log.error("MLflow at %s failed at the end of the run (%s); the run stays open and "
                      "the package is only in %s", self.config.tracking.tracking_uri, exc,
                      self.config.output_dir)


def _log_loss_curve(mlflow, history: list[tuple[int, float]]) -> None:
    """Loss by step, from the run's own metric history (so a resumed run's curve is whole)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in history], [v for _, v in history])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/loss.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("clipgs-train-rank")
    parser.add_argument("--config")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0
                        else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        run(load_config(TrainConfig, args.config, args.overrides))
    except ClipgsError as exc:  # expected: one line from the rank, no traceback
        log.error("rank %s: error: %s", os.environ.get("RANK", "0"), exc)
        return 2
    finally:
        # the process group's threads stopped before the interpreter exits: left to exit,
        # a rank was seen to abort ("terminate called without an active exception") after
        # a run had finished, failing the job
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - never mask the run's own error
                log.warning("destroying the process group: %s", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
