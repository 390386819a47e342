"""One training run with DeepSpeed ZeRO, top to bottom: config, ranks, data, engine, the loop
(step, log, checkpoint), then the fp32 model package and its MLflow run.

Each rank runs ``main(argv)``; ``clipgs train --nproc N`` spawns N local ranks through torchrun,
and under torchrun / the deepspeed launcher / a Kubernetes indexed Job it runs as one rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from clipgs.config import TrainConfig, flatten, load_config, to_yaml
from clipgs.data.loader import train_loader
from clipgs.data.shards import manifest_checksum, read_manifest, shard_urls
from clipgs.models.encoder import GSEncoder
from clipgs.models.package import save_package
from clipgs.train import distributed
from clipgs.train.loss import ClipGSLoss

log = logging.getLogger("clipgs.train")
RESULT = "train_result.json"


class TrainModule(nn.Module):
    """Encoder, learnable logit scale and loss in one module, so that under ZeRO-3 every
    parameter is gathered inside ``forward``."""

    def __init__(self, config: TrainConfig, embed_dim: int):
        super().__init__()
        self.encoder = GSEncoder(config.model, embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(config.loss.logit_scale_init)))
        self.loss = ClipGSLoss(config.loss)
        self.max_log_scale = math.log(config.loss.logit_scale_max)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.encoder(batch["patches"], batch["centres"])
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()[0]
        out = self.loss(g, batch["txt"], batch["img"], scale)
        out["logit_scale"] = scale.detach()
        return out


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim < 2 or "token" in name or "cls_pos" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(config: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config, derived from the typed config (never written by hand)."""
    o = config.optim
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch * config.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": on_gpu},
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "weight_decay": o.weight_decay,
            "torch_adam": not on_gpu}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": config.steps, "warmup_num_steps": o.warmup_steps,
            "warmup_type": "linear", "cos_min_ratio": o.min_lr / o.lr}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _export_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (a collective under ZeRO-3)."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def run(config: TrainConfig) -> dict:
    import deepspeed

    dist_info = distributed.setup()
    torch.manual_seed(config.seed + dist_info.rank)
    manifest = read_manifest(config.data)
    urls = shard_urls(config.data, manifest, "train")
    if not urls:
        raise SystemExit(f"{config.data}: no training shards in the manifest")
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embed_dim = config.model.embed_dim or manifest["embed_dim"]
    module = TrainModule(config, embed_dim)
    ds_config = deepspeed_config(config, dist_info.world_size, dist_info.device.type == "cuda")
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, config.optim.weight_decay),
        config=ds_config)

    mlflow = None
    run_id = None
    if dist_info.is_main:
        from clipgs.tracking import git_commit, setup_mlflow

        mlflow = setup_mlflow(config.tracking.tracking_uri, config.tracking.experiment)
        active = mlflow.start_run(run_name=config.tracking.run_name)
        run_id = active.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(config.model_dump()).items()})
        mlflow.log_text(to_yaml(config), "config.yaml")
        mlflow.log_dict(ds_config, "deepspeed_config.json")
        mlflow.set_tags({"clipgs.stage": "train", "clipgs.git_commit": git_commit(),
                         "clipgs.dataset": config.data,
                         "clipgs.dataset_manifest_sha256": manifest_checksum(manifest),
                         "clipgs.teacher_sha256": manifest["teacher"]["sha256"],
                         "clipgs.world_size": str(dist_info.world_size)})
        log.info("config:\n%s", to_yaml(config))

    loader = iter(train_loader(urls, config, dist_info.rank))
    samples_per_step = config.micro_batch * config.grad_accum * dist_info.world_size
    ckpt_dir = out_dir / "checkpoints"
    t0, window_start, seen = time.time(), time.time(), 0
    history: list[float] = []
    for step in range(1, config.steps + 1):
        for _ in range(config.grad_accum):
            batch = {k: v.to(dist_info.device) for k, v in next(loader).items()}
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
        seen += samples_per_step
        if dist_info.is_main and (step % config.log_every == 0 or step == config.steps):
            elapsed = time.time() - window_start
            window_start = time.time()
            metrics = {k: float(v.detach()) for k, v in out.items()}
            metrics.update(lr=scheduler.get_last_lr()[0],
                           samples_per_s=samples_per_step * config.log_every / max(elapsed, 1e-9),
                           grad_norm=float(engine.get_global_grad_norm() or 0.0))
            history.append(metrics["loss"])
            from clipgs.tracking import log_metrics_safely

            log_metrics_safely(metrics, step)
            log.info("step %d/%d loss %.4f (text %.4f image %.4f) lr %.2e %.1f samples/s",
                     step, config.steps, metrics["loss"], metrics["loss_text"],
                     metrics["loss_image"], metrics["lr"], metrics["samples_per_s"])
        if step % config.checkpoint_every == 0 or step == config.steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:07d}",
                                   client_state={"step": step, "samples_seen": seen})

    state = _export_state(engine, config.zero_stage)
    result = {}
    if dist_info.is_main:
        encoder_state = {k: v for k, v in state.items() if k.startswith("encoder.")}
        meta = {"model": config.model.model_dump(mode="json"), "embed_dim": embed_dim,
                "points": manifest["config"]["points"], "teacher": manifest["teacher"],
                "dataset_manifest_sha256": manifest_checksum(manifest),
                "training_run_id": run_id, "logit_scale": float(state["logit_scale"].exp()[0])}
        package = save_package(out_dir / "package", encoder_state, meta)
        mlflow.log_artifacts(str(package), "package")
        mlflow.log_metrics({"final_loss": history[-1] if history else float("nan"),
                            "train_time_s": time.time() - t0, "samples_seen": seen})
        _log_loss_curve(mlflow, history, config.log_every)
        mlflow.end_run()
        result = {"run_id": run_id, "package": str(package), "steps": config.steps,
                  "samples_seen": seen, "final_loss": history[-1] if history else None,
                  "tracking_uri": config.tracking.tracking_uri}
        (out_dir / RESULT).write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    return result


def _log_loss_curve(mlflow, history: list[float], every: int) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([every * (i + 1) for i in range(len(history))], history)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/loss.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("clipgs-train-rank")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0
                        else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    run(load_config(TrainConfig, args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
