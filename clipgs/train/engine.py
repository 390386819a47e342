"""What DeepSpeed is told, derived from the typed config in one place: the DeepSpeed config
(ZeRO stage, precision, accumulation, clipping, AdamW with warm-up and cosine decay, optional
ZeRO-Offload), the optimizer's parameter groups, and activation checkpointing."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from clipgs.config import TrainConfig
from clipgs.errors import ConfigError


def use_bf16(config: TrainConfig, on_gpu: bool) -> bool:
    return config.precision == "bf16" or (config.precision == "auto" and on_gpu)


def deepspeed_config(config: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config, derived from the typed config (never written by hand)."""
    o = config.optim
    zero: dict = {"stage": config.zero_stage}
    if config.zero_stage == 3:
        # buckets scaled to the model (as Hugging Face's "auto" values): DeepSpeed's defaults
        # (5e8 elements) allocate a 2 GB flat buffer per rank whatever the model's size
        w = config.model.width
        zero.update(reduce_bucket_size=w * w, stage3_prefetch_bucket_size=int(0.9 * w * w),
                    stage3_param_persistence_threshold=10 * w)
    if config.offload_optimizer:
        if config.zero_stage == 0:
            raise ConfigError("offload_optimizer=true needs zero_stage 1, 2 or 3 (ZeRO-Offload "
                              "moves the partitioned optimizer state to CPU memory)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ds = {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch * config.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(config, on_gpu)},
        # CPU ranks have no fused CUDA Adam: torch's AdamW (also under ZeRO-Offload, where
        # GPUs get DeepSpeedCPUAdam)
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "weight_decay": o.weight_decay,
            "torch_adam": not on_gpu}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": config.steps, "warmup_num_steps": o.warmup_steps,
            "warmup_type": "linear", "cos_min_ratio": o.min_lr / o.lr}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.offload_optimizer and not on_gpu:
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def bf16_buffers(module: nn.Module) -> nn.Module:
    """DeepSpeed's bf16 mode casts the parameters, not the buffers: BatchNorm's running
    statistics would stay fp32 beside bf16 weights and inputs, which batch_norm rejects."""
    for buf in module.buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(torch.bfloat16)
    return module


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and embeddings (the serialization's
    ``seq_embed`` and ``order_embed`` included)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        no = p.ndim < 2 or "token" in name or "cls_pos" in name or leaf.endswith("_embed")
        (no_decay if no else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def checkpoint_blocks(encoder: nn.Module) -> int:
    """Activation checkpointing: each transformer block keeps only its input and recomputes
    its activations in the backward pass. The block's ``forward`` is wrapped on the instance,
    so parameter names (checkpoints, the exported package) stay as they are; under ZeRO-3 the
    recompute goes through the sub-modules' hooks, which gather their parameters again."""
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ConfigError("activation_checkpointing=true: the encoder has no transformer "
                          "blocks (encoder.blocks) to checkpoint")
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return len(blocks)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save memory on
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
