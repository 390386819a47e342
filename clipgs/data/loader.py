"""The training stream: shards from a folder or s3:// split by node (rank) and data-loader
worker, shuffled, decoded, grouped into patches (in the workers, or later on the training
device), batched.

Two ways to hand out shards (``data_mode``):
- ``resampled`` (default): every rank and worker draws shards with replacement from its own
  seeded generator, an endless stream, so no rank waits on another at an epoch boundary (what
  multi-node runs want; webdataset's ResampledShards).
- ``split``: each epoch's shards (one permutation shared by all) are dealt out by rank and
  worker, so an epoch sees every shard once; it needs at least ranks x workers shards.

Every generator is seeded from (seed, rank, worker, ``start_step``): a run resumed at step S
reseeds its streams from S, so it is reproducible and draws the same number of samples as the
run it replaces (the position is the step; see clipgs/train/checkpoint.py).
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from clipgs.config import TrainConfig
from clipgs.data.shards import decode_sample, register_s3_scheme
from clipgs.errors import ConfigError, StorageError
from clipgs.models.tokenizer import fps_numpy, group_numpy

log = logging.getLogger(__name__)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def stream_seed(seed: int, rank: int, start_step: int) -> str:
    # a string seed: random.Random hashes it with sha512, the same in every process
    return f"clipgs-{seed}-{rank}-{start_step}"


class SplitShards(torch.utils.data.IterableDataset):
    """Endless epochs; each epoch one shared permutation of the shards, dealt out by
    (rank, worker), so ranks and workers never read the same shard in an epoch."""

    def __init__(self, urls: list[str], shared_seed: str, rank: int, world_size: int):
        super().__init__()
        self.urls, self.seed, self.rank, self.world = list(urls), shared_seed, rank, world_size

    def __iter__(self):
        worker, workers = _worker()
        slots = self.world * workers
        if len(self.urls) < slots:
            raise ConfigError(f"data_mode=split: {len(self.urls)} training shards for {slots} "
                              "readers (ranks x loader_workers); use data_mode=resampled or "
                              "ingest smaller shards")
        # dealt round-robin: an epoch reads every shard once (readers may differ by one
        # shard an epoch; the stream is endless, so none runs dry)
        mine = self.rank * workers + worker
        epoch = 0
        while True:
            order = random.Random(f"{self.seed}-epoch-{epoch}").sample(self.urls,
                                                                       len(self.urls))
            for url in order[mine::slots]:
                yield {"url": url}
            epoch += 1


class ReadErrors:
    """A shard that cannot be read is skipped with a warning, as webdataset's
    ``warn_and_continue`` does; but ``limit`` failures in a row with no sample between (no
    shard readable: deleted, no credentials) are an error, not a loader that spins for ever."""

    def __init__(self, limit: int):
        self.limit, self.run = max(limit, 4), 0

    def handler(self, exc: Exception) -> bool:
        self.run += 1
        if self.run >= self.limit:
            raise StorageError(f"{self.run} shard reads failed in a row, none readable (last: "
                               f"{exc}); check the shards and the storage credentials")
        log.warning("skipping a shard that cannot be read: %s", exc)
        return True

    def ok(self, sample: dict) -> dict:
        self.run = 0
        return sample


def shuffled(bufsize: int, seed: str):
    """A webdataset stage: buffer shuffle seeded per worker (webdataset's own ``shuffle``
    seeds from the clock, and a fixed rng would be copied into every worker)."""
    from webdataset.filters import _shuffle

    def stage(src):
        if bufsize <= 1:
            yield from src
            return
        rng = random.Random(f"{seed}-worker-{_worker()[0]}")
        yield from _shuffle(src, bufsize, min(bufsize, 64), rng=rng)

    return stage


def to_training_sample(sample: dict, groups: int | None, group_size: int) -> dict:
    """Decoded sample -> arrays for the model; ``groups=None`` leaves grouping to the device."""
    out = {"txt": sample["txt_emb"].astype(np.float32),
           "img": sample["img_emb"].astype(np.float32)}
    if groups is None:
        out["gaussians"] = sample["gaussians"].astype(np.float32)
        # the FPS start group_numpy would use (fpsample's kd-ordered first centre; the same
        # whatever the number of centres): with it the device path gives the package's groups,
        # for a fraction of the worker's grouping (the kd build, not the FPS loop or the kNN)
        out["fps_start"] = np.int64(fps_numpy(out["gaussians"][:, :3], 1)[0])
    else:
        out["patches"], out["centres"] = group_numpy(sample["gaussians"], groups, group_size)
    return out


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    # webdataset carries __key__ / __url__ through map(); only the arrays are batched
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]
            if not k.startswith("__")}


def group_on_device(batch: dict[str, torch.Tensor], groups: int, group_size: int
                    ) -> dict[str, torch.Tensor]:
    """The ``grouping=device`` path: raw gaussians [B, M, 14] -> patches and centres, batched
    on the training device (FPS's sequential loop is cheap there, costly in a CPU worker)."""
    from clipgs.models.tokenizer import group_torch

    if "gaussians" not in batch:
        return batch
    out = dict(batch)
    start = out.pop("fps_start", 0)
    with torch.no_grad():
        out["patches"], out["centres"] = group_torch(out.pop("gaussians"), groups, group_size,
                                                     start=start)
    return out


def train_loader(urls: list[str], config: TrainConfig, rank: int, world_size: int = 1,
                 start_step: int = 0) -> torch.utils.data.DataLoader:
    import webdataset as wds

    register_s3_scheme()
    seed = stream_seed(config.seed, rank, start_step)
    if config.data_mode == "resampled":
        # deterministic: seeded from (seed, epoch) and webdataset's per-(rank, worker) seed
        source = wds.ResampledShards(urls, seed=random.Random(seed).getrandbits(62),
                                     deterministic=True)
    else:
        # one permutation per epoch shared by every rank: seeded without the rank
        source = SplitShards(urls, stream_seed(config.seed, -1, start_step), rank, world_size)
    m = config.model
    groups = m.groups if config.grouping == "loader" else None
    errors = ReadErrors(2 * len(urls))
    pipeline = wds.DataPipeline(
        source,
        wds.tarfile_to_samples(handler=errors.handler),
        wds.map(errors.ok),
        shuffled(config.shuffle_buffer, seed),
        wds.map(decode_sample),
        wds.map(lambda s: to_training_sample(s, groups, m.group_size)),
        wds.batched(config.micro_batch, collation_fn=collate, partial=False),
    )
    workers = config.loader_workers
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available())
