"""Rank and world size from the standard environment (torchrun, the deepspeed launcher or a
Kubernetes indexed Job all set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the
backend from the device: NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(rank, world, local, device, backend)


def on_rank0(fn, dist_info: DistInfo):
    """``fn()`` on rank 0 only, its result given to every rank: checks that read shared
    storage (an S3 listing of every shard, the newest checkpoint) are made once, not once a
    rank - a thousand ranks listing one bucket at the same moment is a thousand listings.

    The result travels as JSON (nothing is unpickled), so every rank, rank 0 included, gets
    it as JSON gives it back: a tuple as a list. An exception on rank 0 is re-raised there;
    every other rank raises a ``ClipgsError`` with the same message, so no rank waits for a
    result that never comes."""
    from clipgs.errors import ClipgsError

    if dist_info.world_size == 1:
        return fn()
    import json

    import torch.distributed as dist

    failure = None
    if dist_info.rank == 0:
        try:
            payload = {"ok": fn()}
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others hear
            failure = exc
            payload = {"error": str(exc), "type": type(exc).__name__}
        data = json.dumps(payload).encode()
        size = torch.tensor([len(data)], dtype=torch.int64, device=dist_info.device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dist_info.device)
    dist.broadcast(size, src=0)
    if dist_info.rank == 0:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dist_info.device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dist_info.device)
    dist.broadcast(buf, src=0)
    if failure is not None:
        raise failure
    payload = json.loads(buf.cpu().numpy().tobytes().decode())
    if "error" in payload:
        raise ClipgsError(f"rank 0 ({payload['type']}): {payload['error']}")
    return payload["ok"]
