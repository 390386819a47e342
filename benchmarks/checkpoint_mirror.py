"""How long training stands still for each checkpoint with an S3 mirror: the copy in a
background thread (``checkpoint_mirror_background=true``, the default) against the same copy
made while the step waits (``false``, the anchor: what clipgs did before).

One rank, a real DeepSpeed ZeRO-1 engine and ``checkpoint.save`` / ``MirrorCopy`` as the
trainer calls them, the mirror on moto's S3 server on loopback (real boto3 client). Between
checkpoints the job trains ``--steps-between`` steps. ``--step sleep`` (the default) stands a
GPU step in with ``time.sleep(--step-s)``: on a GPU node the step leaves the CPU free for the
copy. ``--step cpu`` trains real DeepSpeed steps on the CPU instead, where the copy and the
step share the cores (and here moto shares them too). Rounds alternate the two modes; the
figure is the median over rounds of the time the loop spent in ``save`` per checkpoint (a wait
for the copy before it included), with the wait at the end of the job for the last copy (in
both modes) and the whole job's wall time.

    .venv/bin/python -m benchmarks.checkpoint_mirror [--rounds 3 --checkpoints 4 \
        --steps-between 10 --step-s 0.5 --step sleep|cpu] [TrainConfig overrides]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--steps-between", type=int, default=10)
    parser.add_argument("--step-s", type=float, default=0.5, help="--step sleep: a step's time")
    parser.add_argument("--step", choices=["sleep", "cpu"], default="sleep")
    parser.add_argument("--embed-dim", type=int, default=384)
    parser.add_argument("overrides", nargs="*", help="TrainConfig overrides (default: "
                        "model.size=small, 22.4 M parameters)")
    args = parser.parse_args()
    from benchmarks._common import moto_server, single_rank_env

    single_rank_env()
    logging.getLogger("clipgs").setLevel(logging.ERROR)
    proc, endpoint = moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        run(args)
    finally:
        proc.terminate()
        proc.wait(10)


def run(args) -> None:
    import deepspeed

    from benchmarks.train_step_overhead import batch
    from clipgs.config import TrainConfig, load_config
    from clipgs.data import storage
    from clipgs.train import checkpoint, distributed
    from clipgs.train.engine import deepspeed_config, param_groups
    from clipgs.train.mirror import MirrorCopy
    from clipgs.train.trainer import TrainModule

    cfg = load_config(TrainConfig, None, ["micro_batch=8", "zero_stage=1",
                                          *(args.overrides or ["model.size=small"])])
    info = distributed.setup()
    torch.manual_seed(0)
    module = TrainModule(cfg, args.embed_dim)
    engine, *_ = deepspeed.initialize(
        model=module, config=deepspeed_config(cfg, 1, False),
        model_parameters=param_groups(module, cfg.optim.weight_decay))
    data = batch(cfg, args.embed_dim)

    def train_step():
        if args.step == "sleep":
            time.sleep(args.step_s)
        else:
            engine.backward(engine(data)["loss"])
            engine.step()

    engine.backward(engine(data)["loss"])  # Adam's state exists before the first save
    engine.step()
    storage.s3_client().create_bucket(Bucket="bench")
    stalls: dict[bool, list[float]] = {False: [], True: []}
    ends: dict[bool, list[float]] = {False: [], True: []}
    walls: dict[bool, list[float]] = {False: [], True: []}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for background in (False, True):
                ckpt = Path(tmp) / f"r{r}-{int(background)}"
                mirror = f"s3://bench/r{r}-{int(background)}"
                copy = MirrorCopy(mirror, ckpt, 0, 0, keep=2, device=info.device,
                                  background=background)
                stall, t0 = 0.0, time.perf_counter()
                for c in range(1, args.checkpoints + 1):
                    for _ in range(args.steps_between):
                        train_step()
                    t = time.perf_counter()
                    checkpoint.save(engine, ckpt, c * args.steps_between, {"step": c},
                                    0, 0, keep=2, mirror=copy)
                    stall += time.perf_counter() - t
                t = time.perf_counter()
                copy.wait()  # the end of the job waits for the last copy in both modes
                ends[background].append(time.perf_counter() - t)
                walls[background].append(time.perf_counter() - t0)
                stalls[background].append(stall / args.checkpoints)
                assert checkpoint.complete_steps(mirror)[-1] == args.checkpoints * \
                    args.steps_between, "the last checkpoint is not complete in the mirror"
                size = sum(storage.list_sizes(storage.join(
                    mirror, checkpoint.tag_for(args.checkpoints * args.steps_between))).values())
                shutil.rmtree(ckpt)

    n_params = sum(p.numel() for p in module.parameters())
    step = f"sleep {args.step_s} s" if args.step == "sleep" else "DeepSpeed step on the CPU"
    print(f"model width {cfg.model.width} depth {cfg.model.depth} ({n_params / 1e6:.1f} M "
          f"parameters), ZeRO-1, checkpoint {size / 2**20:.0f} MiB, mirror on moto S3 "
          f"(loopback); {args.checkpoints} checkpoints, {args.steps_between} steps ({step}) "
          f"between; median of {args.rounds} rounds")
    anchor_stall, anchor_wall = (statistics.median(stalls[False]),
                                 statistics.median(walls[False]))
    for background, name in ((False, "copy while the step waits (anchor)"),
                             (True, "copy in the background")):
        s, w = statistics.median(stalls[background]), statistics.median(walls[background])
        print(f"{name:36s} in save {s:6.2f} s/checkpoint (ratio {s / anchor_stall:.2f}), "
              f"end of job waits {statistics.median(ends[background]):5.2f} s; "
              f"job {w:6.1f} s (ratio {w / anchor_wall:.2f})")


if __name__ == "__main__":
    main()
