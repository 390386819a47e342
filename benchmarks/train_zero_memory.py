"""Per-rank memory of the training state (parameters, gradients, optimizer state and
DeepSpeed's buffers) at ZeRO 0, 1, 2 and 3 on 2 CPU ranks, for the base size (Uni3D base:
width 768, depth 12, heads 12). Goal: ZeRO-3 at most 0.6x of ZeRO-0.

Each stage is a real 2-rank run (torchrun, gloo) that takes two optimizer steps on a random
batch; each rank counts every live tensor's storage once (gc scan, so DeepSpeed's flat
buffers and ZeRO-3's partitions count as what they are) after the second backward (gradients
alive) and after the second step, and keeps the larger; RSS beside it. The anchor is ZeRO-0
in the same invocation.

    .venv/bin/python -m benchmarks.train_zero_memory [--precision fp32|bf16] [overrides...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def live_tensor_bytes() -> int:
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - tensors without storage (sparse, wrappers)
            continue
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(args) -> None:
    import deepspeed
    import psutil
    import torch

    from benchmarks.train_step_overhead import batch
    from clipgs.config import TrainConfig, load_config
    from clipgs.train import distributed
    from clipgs.train.engine import bf16_buffers, deepspeed_config, param_groups
    from clipgs.train.trainer import TrainModule

    cfg = load_config(TrainConfig, None, [f"zero_stage={args.stage}", "micro_batch=2",
                                          f"precision={args.precision}", *args.overrides])
    info = distributed.setup()
    torch.manual_seed(0)
    module = TrainModule(cfg, args.embed_dim)
    if cfg.precision == "bf16":
        bf16_buffers(module)
    n_params = sum(p.numel() for p in module.parameters())
    engine, *_ = deepspeed.initialize(model=module, config=deepspeed_config(
        cfg, info.world_size, False), model_parameters=param_groups(module, 0.05))
    data = batch(cfg, args.embed_dim)
    if cfg.precision == "bf16":
        data = {k: v.to(torch.bfloat16) for k, v in data.items()}
    engine.backward(engine(data)["loss"])
    engine.step()  # step 1 creates the optimizer state
    engine.backward(engine(data)["loss"])
    after_backward = live_tensor_bytes()  # gradients are alive until the step
    engine.step()
    result = {"rank": info.rank, "stage": args.stage, "params": n_params,
              "state_bytes": max(after_backward, live_tensor_bytes()),
              "rss_bytes": psutil.Process().memory_info().rss}
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--embed-dim", type=int, default=384)
    parser.add_argument("overrides", nargs="*", default=[],
                        help="TrainConfig overrides (default: model.size=base)")
    args = parser.parse_args()
    args.overrides = args.overrides or ["model.size=base"]
    if args.worker:
        worker(args)
        return
    from clipgs.train.launch import free_port

    rows = {}
    for stage in (0, 1, 2, 3):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", "-m", "benchmarks.train_zero_memory",
                   "--worker", f"--stage={stage}", f"--out={out}",
                   f"--precision={args.precision}", f"--embed-dim={args.embed_dim}",
                   *args.overrides]
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"ZeRO-{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rows[stage] = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    anchor = max(r["state_bytes"] for r in rows[0])
    gib = 2**30
    print(f"{' '.join(args.overrides)}: {rows[0][0]['params'] / 1e6:.1f} M parameters, "
          f"2 CPU ranks (gloo), {args.precision}; parameters + gradients + optimizer state at "
          "their peak, the larger rank")
    for stage, ranks in rows.items():
        state = max(r["state_bytes"] for r in ranks)
        rss = max(r["rss_bytes"] for r in ranks)
        print(f"ZeRO-{stage}: training state {state / gib:6.2f} GiB per rank "
              f"(ratio to ZeRO-0 {state / anchor:.2f}), RSS {rss / gib:5.2f} GiB")


if __name__ == "__main__":
    main()
