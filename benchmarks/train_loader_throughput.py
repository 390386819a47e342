"""Data-loader throughput against training consumption, per rank (goal: at least 2x, so that
loading never starves the step).

Loader: the training stream of clipgs/data/loader.py on real shards (resampled, shuffled,
decoded, FPS + kNN grouping in the workers, batched), samples per second after a warm-up
batch, for 1 and 2 data-loader workers. Anchor: one rank's training consumption, samples per
second of DeepSpeed steps (ZeRO-1, fp32, one CPU rank) on a batch from that loader. Both are
measured here, one after the other (the steps alone, then the loader alone: on a machine with
more cores than this one they run side by side).

    .venv/bin/python -m benchmarks.train_loader_throughput [--data SHARDS] [overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def make_shards(root: Path) -> str:
    """Primitives (8 per class, 1024 gaussians, 4 views) ingested with the default teacher."""
    from clipgs.config import IngestConfig
    from clipgs.data.ingest import ingest
    from clipgs.data.synthetic import generate

    src = generate(root / "primitives", per_class=8, gaussians=4096)
    ingest(str(src), str(root / "shards"), IngestConfig(shard_size=16))
    return str(root / "shards")


def loader_rate(urls, cfg, batches: int) -> float:
    from clipgs.data.loader import train_loader

    it = iter(train_loader(urls, cfg, rank=0, world_size=1))
    next(it)  # workers started, shuffle buffer primed
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.micro_batch / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", help="shards with a manifest (default: generated here)")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="TrainConfig overrides")
    args = parser.parse_args()
    from benchmarks._common import single_rank_env

    single_rank_env()
    import deepspeed
    import torch

    from clipgs.config import TrainConfig, load_config
    from clipgs.data.loader import train_loader
    from clipgs.data.shards import read_manifest, shard_urls
    from clipgs.train import distributed
    from clipgs.train.engine import deepspeed_config, param_groups
    from clipgs.train.trainer import TrainModule

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_shards(Path(tmp))
        manifest = read_manifest(data)
        urls = shard_urls(data, manifest, "train")
        cfg = load_config(TrainConfig, None, [f"data={data}", *args.overrides])
        distributed.setup()
        torch.manual_seed(0)
        module = TrainModule(cfg, manifest["embed_dim"])
        engine, *_ = deepspeed.initialize(model=module, config=deepspeed_config(cfg, 1, False),
                                          model_parameters=param_groups(module, 0.05))
        batch = next(iter(train_loader(urls, cfg.model_copy(update={"loader_workers": 0}), 0)))
        times = []
        for i in range(args.steps + 2):
            t = time.perf_counter()
            engine.backward(engine(batch)["loss"])
            engine.step()
            if i >= 2:  # warm-up: allocator, Adam state
                times.append(time.perf_counter() - t)
        train_rate = cfg.micro_batch / statistics.median(times)
        del engine, module  # the loaders below run without the model's memory and threads
        rates = {}
        for workers in (1, 2):
            rates[workers] = loader_rate(urls, cfg.model_copy(update={"loader_workers": workers}),
                                         args.batches)

    print(f"{manifest['config']['points']} gaussians per object, micro-batch {cfg.micro_batch}, "
          f"model width {cfg.model.width} depth {cfg.model.depth}, groups {cfg.model.groups}x"
          f"{cfg.model.group_size}; torch threads {torch.get_num_threads()}")
    print(f"training consumption (1 rank, ZeRO-{cfg.zero_stage}): {train_rate:7.1f} samples/s")
    for workers, rate in rates.items():
        print(f"loader, {workers} worker(s):                {rate:7.1f} samples/s   "
              f"ratio to training {rate / train_rate:.2f}")


if __name__ == "__main__":
    main()
