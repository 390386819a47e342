"""The ModelNet10 benchmark's training: the model (encoder + learnable logit scale + loss), its
augmentations, the plain single-process PyTorch loop, and the bf16/fp32 probe. Used by
benchmarks/modelnet10.py.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn

from benchmarks._modelnet10_cache import log
from clipgs.config import LossConfig, ModelConfig
from clipgs.data.gaussians import SLICES
from clipgs.models.encoder import GSEncoder
from clipgs.models.tokenizer import group_torch
from clipgs.train.loss import ClipGSLoss

XYZ, SCALE, ROT = SLICES["xyz"], SLICES["scale"], SLICES["rotation"]


def augment(points: torch.Tensor, gen: torch.Generator, factor: float = 1.0,
            mirror: tuple[int, ...] = (), jitter: float = 0.0) -> torch.Tensor:
    """Training augmentations of a batch [B, M, 14] of activated gaussians:

    - ``factor``: random anisotropic scaling (1/factor to factor per axis), renormalised to the
      unit ball as activation does; gaussian scales follow their positions. 1 = none.
    - ``mirror``: each object mirrored along each of these axes with probability 1/2. A mirror
      keeps every proportion (what tells a desk from a table), unlike scaling; the centroid
      stays at the origin and the unit ball is kept. Each gaussian's rotation is mirrored too:
      reflecting axis a maps R to M R M, whose quaternion has the two components of the other
      axes negated.
    - ``jitter``: gaussian noise of this standard deviation on each position (PointNet's,
      clipped at 5 sigma); it also breaks the exact distance ties of voxel lattices."""
    if factor == 1 and not mirror and not jitter:
        return points
    b = points.shape[0]
    p = points.clone()
    if factor != 1:
        s = torch.exp(torch.empty(b, 1, 3).uniform_(-math.log(factor), math.log(factor),
                                                       generator=gen))
        p[..., XYZ] *= s
        # clamped: a few grids have a single voxel (every gaussian at the centroid)
        radius = p[..., XYZ].norm(dim=-1).amax(dim=1, keepdim=True)[..., None]
        radius = radius.clamp_min(1e-6)
        p[..., XYZ] /= radius
        p[..., SCALE] *= s / radius
    for axis in mirror:
        sign = torch.where(torch.rand(b, 1, generator=gen) < 0.5, -1.0, 1.0)
        p[..., XYZ.start + axis] *= sign
        for other in {0, 1, 2} - {axis}:  # quaternion (w, x, y, z): negate the other two
            p[..., ROT.start + 1 + other] *= sign
    if jitter:
        noise = torch.randn(p[..., XYZ].shape, generator=gen) * jitter
        p[..., XYZ] += noise.clamp(-5 * jitter, 5 * jitter)
    return p


class Model(nn.Module):
    """Encoder + learnable logit scale (clamped, as the trainer's) + loss."""

    def __init__(self, model: ModelConfig, loss: LossConfig, embed_dim: int):
        super().__init__()
        self.encoder = GSEncoder(model, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(loss.logit_scale_init)))
        self.max_log_scale = math.log(loss.logit_scale_max)
        self.loss = ClipGSLoss(loss)

    def forward(self, patches, centres, txt, img, bf16: bool = False):
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        # bf16 autocast covers the encoder's matmuls and convolutions; the loss is fp32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            g = self.encoder(patches, centres)
        out = self.loss(g.float(), txt, img, scale)
        out["scale"] = scale.detach()
        return out


def train(model: Model, cache: dict, args, on_log=None) -> tuple[list[dict], dict | None]:
    """AdamW with warm-up and cosine decay over the run's progress: steps done / --steps;
    otherwise the further along of steps done / the steps of --epochs and wall-clock time /
    --minutes, so a fast CPU stops after --epochs and a slow one compresses the same schedule
    into the time budget (0 turns either off). With
    --unmasked-tail F, the last F of the run trains without patch dropout (FLIP's unmasked
    tuning: the model is evaluated on every patch, so it ends by training on every patch).
    Each logged row also goes to ``on_log`` (the MLflow run's live curve) when given.
    Returns the history and, with --ema, the encoder's exponential moving average."""
    train_idx = np.nonzero((cache["split"] == 0) & cache["valid"])[0]
    points = torch.from_numpy(cache["points"])
    txt = torch.from_numpy(cache["train_txt"])[torch.from_numpy(cache["label"])]
    img = torch.from_numpy(cache["img_emb"])
    decayed = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.05},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr,
                            betas=(0.9, 0.98))

    def lr_at(progress: float) -> float:
        if progress < 0.05:
            return args.lr * max(progress, 0.002) / 0.05
        t = min(1.0, (progress - 0.05) / 0.95)
        return 1e-5 + 0.5 * (args.lr - 1e-5) * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    order, pos, history = rng.permutation(train_idx), 0, []
    # the encoder's weights (and BatchNorm statistics) averaged over the last ~1/(1-decay) steps
    ema = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()} \
        if args.ema else None
    # (average, live) pairs, once: the optimiser and BatchNorm update the live tensors in place
    tracked = [(ema[k], v) for k, v in model.encoder.state_dict().items()] if ema else []
    config = model.encoder.config
    dropout = config.patch_dropout
    model.train()
    t0 = window = time.time()
    cpu0 = time.process_time()
    total = args.steps or (math.ceil(args.epochs * len(train_idx) / args.batch)
                           if args.epochs else None)
    budget = args.minutes * 60 if args.minutes and not args.steps else None
    step, unmasked_from = 0, None
    while True:
        progress = max(step / total if total else 0.0,
                       (time.time() - t0) / budget if budget else 0.0)
        if progress >= 1.0:
            break
        if args.unmasked_tail and unmasked_from is None and progress >= 1 - args.unmasked_tail:
            unmasked_from = step
            config.patch_dropout = 0.0
            log(f"step {step}: the last {100 * args.unmasked_tail:g}% of the run trains on "
                "every patch (no patch dropout)")
        if pos + args.batch > len(order):
            order, pos = rng.permutation(train_idx), 0
        idx = torch.from_numpy(order[pos:pos + args.batch])
        pos += args.batch
        keep = torch.rand(len(idx), points.shape[1], generator=gen).argsort(1)[:, :args.points]
        # a new random subset every step
        batch = augment(points[idx[:, None], keep], gen, args.scale_augment, args.mirror,
                        args.jitter)
        start = torch.randint(0, batch.shape[1], (len(idx),), generator=gen)
        patches, centres = group_torch(batch, args.groups, args.group_size, start=start)
        for group in opt.param_groups:
            group["lr"] = lr_at(progress)
        out = model(patches, centres, txt[idx], img[idx], bf16=args.precision == "bf16")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory while it warms up
        with torch.no_grad():
            for average, live in tracked:
                if live.is_floating_point():
                    average.lerp_(live, 1 - decay)
                else:
                    average.copy_(live)
        if step % args.log_every == 0:
            rate = args.log_every * args.batch / (time.time() - window)
            window = time.time()
            row = {k: round(float(v.detach()), 4) for k, v in out.items()}
            row.update(step=step, lr=lr_at(progress), elapsed_s=round(time.time() - t0),
                       cpu_s=round(time.process_time() - cpu0),
                       epochs=round(step * args.batch / len(train_idx), 2))
            history.append(row)
            if on_log:
                on_log(row)
            log(f"step {step} ({100 * progress:.0f}%) epoch {row['epochs']:.1f} loss "
                f"{row['loss']:.3f} (text {row['loss_text']:.3f}, image "
                f"{row['loss_image']:.3f}) scale {row['scale']:.1f} lr {row['lr']:.1e} "
                f"{rate:.0f} obj/s")
    config.patch_dropout = dropout
    history.append({"step": step, "elapsed_s": round(time.time() - t0),
                    "cpu_s": round(time.process_time() - cpu0),
                    "epochs": round(step * args.batch / len(train_idx), 2),
                    "unmasked_from_step": unmasked_from})
    return history, ema


def time_precisions(model: Model, cache: dict, args, rounds: int = 3,
                    clear: float = 2.0) -> dict[str, float]:
    """Milliseconds per training step (forward + backward, one batch) in bf16 and in fp32,
    interleaved rounds, the best of each kept. On a copy of the model and under a forked RNG,
    so the run itself is the same as one started with the chosen --precision. Stops after the
    first timed round when one precision is over ``clear`` times slower: on a CPU without
    AVX512-BF16 a bf16 step takes 24x an fp32 one (5.7 s), and more rounds would only spend
    the run's time confirming it."""
    probe = copy.deepcopy(model).train()
    idx = torch.from_numpy(np.nonzero((cache["split"] == 0) & cache["valid"])[0][:args.batch])
    batch = torch.from_numpy(cache["points"])[idx][:, :args.points]
    txt = torch.from_numpy(cache["train_txt"])[torch.from_numpy(cache["label"])[idx]]
    img = torch.from_numpy(cache["img_emb"])[idx]
    best = {"bf16": math.inf, "fp32": math.inf}
    with torch.random.fork_rng():
        patches, centres = group_torch(batch, args.groups, args.group_size)
        for r in range(rounds + 1):  # the first round warms up both
            for precision in best:
                t = time.perf_counter()
                probe(patches, centres, txt, img, bf16=precision == "bf16")["loss"].backward()
                if r:
                    best[precision] = min(best[precision], 1e3 * (time.perf_counter() - t))
            if r and max(best.values()) > clear * min(best.values()):
                break
    return best
