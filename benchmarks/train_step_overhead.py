"""Step time of the DeepSpeed engine against a plain PyTorch loop on the same model and batch,
one rank (goal: overhead at most 10%).

The anchor is the loop DeepSpeed replaces: forward, backward, gradient clipping, torch's
AdamW with the same parameter groups and DeepSpeed's WarmupCosineLR schedule. Both run in
this process on one fixed batch (no data loading), rounds interleaved so that load from
other processes falls on both alike; the figure is the median over rounds of each round's
mean step time.

    .venv/bin/python -m benchmarks.train_step_overhead [--rounds 7 --steps 5 --micro-batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def batch(cfg, embed_dim: int, views: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, m = cfg.micro_batch, cfg.model
    img = torch.nn.functional.normalize(torch.randn(b, views, embed_dim, generator=g), dim=-1)
    return {"patches": torch.randn(b, m.groups, m.group_size, 14, generator=g),
            "centres": torch.randn(b, m.groups, 3, generator=g),
            "txt": torch.nn.functional.normalize(torch.randn(b, embed_dim, generator=g), dim=-1),
            "img": img}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=384)  # the offline teacher's width
    parser.add_argument("overrides", nargs="*", help="TrainConfig overrides, e.g. model.size=base")
    args = parser.parse_args()
    from benchmarks._common import single_rank_env

    single_rank_env()
    import deepspeed
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from clipgs.config import TrainConfig, load_config
    from clipgs.train import distributed
    from clipgs.train.engine import deepspeed_config, param_groups
    from clipgs.train.trainer import TrainModule

    cfg = load_config(TrainConfig, None, [f"micro_batch={args.micro_batch}", *args.overrides])
    distributed.setup()
    data = batch(cfg, args.embed_dim)

    def plain():
        torch.manual_seed(0)
        module = TrainModule(cfg, args.embed_dim)
        o = cfg.optim
        opt = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr,
                                betas=o.betas, eps=1e-8)
        sched = WarmupCosineLR(opt, total_num_steps=cfg.steps, warmup_num_steps=o.warmup_steps,
                               warmup_type="linear", cos_min_ratio=o.min_lr / o.lr)

        def step():
            opt.zero_grad(set_to_none=True)
            module(data)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
            opt.step()
            sched.step()
        return step

    def engine(stage: int):
        torch.manual_seed(0)
        module = TrainModule(cfg, args.embed_dim)
        cfg_s = cfg.model_copy(update={"zero_stage": stage})
        eng, *_ = deepspeed.initialize(
            model=module, config=deepspeed_config(cfg_s, 1, False),
            model_parameters=param_groups(module, cfg.optim.weight_decay))

        def step():
            eng.backward(eng(data)["loss"])
            eng.step()
        return step

    variants = {"plain PyTorch loop": plain(), "DeepSpeed ZeRO-0": engine(0),
                "DeepSpeed ZeRO-1": engine(1)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up: allocator, Adam state
        step(), step()
    for _ in range(args.rounds):
        for name, step in variants.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps)
    anchor = statistics.median(times["plain PyTorch loop"])
    n_params = sum(p.numel() for p in TrainModule(cfg, args.embed_dim).parameters())
    print(f"model width {cfg.model.width} depth {cfg.model.depth} ({n_params / 1e6:.1f} M "
          f"parameters), micro-batch {cfg.micro_batch}, 1 CPU rank, fp32, torch threads "
          f"{torch.get_num_threads()}; median of {args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med * 1e3:8.1f} ms/step   ratio to plain loop {med / anchor:.3f}")


if __name__ == "__main__":
    main()
