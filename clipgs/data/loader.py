"""The training stream: shards from a folder or s3:// resampled per rank and worker (so every
rank sees an endless, different stream and no rank waits on another at the end of an epoch),
shuffled, decoded, grouped into patches in the data-loader workers, batched."""

from __future__ import annotations

import numpy as np
import torch

from clipgs.config import TrainConfig
from clipgs.data.shards import decode_sample, register_s3_scheme
from clipgs.models.tokenizer import group_numpy


def to_training_sample(sample: dict, groups: int, group_size: int) -> dict:
    patches, centres = group_numpy(sample["gaussians"], groups, group_size)
    return {"patches": patches, "centres": centres,
            "txt": sample["txt_emb"].astype(np.float32),
            "img": sample["img_emb"].astype(np.float32)}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    # webdataset carries __key__ / __url__ through map(); only the arrays are batched
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]
            if not k.startswith("__")}


def train_loader(urls: list[str], config: TrainConfig, rank: int) -> torch.utils.data.DataLoader:
    import webdataset as wds

    register_s3_scheme()
    m = config.model
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=config.seed + 7919 * rank),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(config.shuffle_buffer, initial=min(config.shuffle_buffer, 64)),
        wds.map(decode_sample),
        wds.map(lambda s: to_training_sample(s, m.groups, m.group_size)),
        wds.batched(config.micro_batch, collation_fn=collate, partial=False),
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None,
                                       num_workers=config.loader_workers,
                                       persistent_workers=config.loader_workers > 0)
