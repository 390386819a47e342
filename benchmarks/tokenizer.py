"""Grouping 10k gaussians into 512 patches of 32 (the paper's setting), per object on CPU.

Ours (clipgs.models.tokenizer.group_numpy: what data-loader workers run) side by side with the
named anchor, a plain ``fpsample.bucket_fps_kdline_sampling(h=7)`` + ``scipy.spatial.cKDTree``
(default build) + the same numpy gather, on the 12 real 10k-gaussian objects of
../shared/data/splats. Then the batched torch path (group_torch) in objects/s, on the GPU when
there is one, else on the CPU (printed).

    .venv/bin/python -m benchmarks.tokenizer [--repeats 15] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import fpsample
import numpy as np
import torch
from scipy.spatial import cKDTree

from clipgs.data.formats import read_gaussians
from clipgs.data.gaussians import SLICES, resample
from clipgs.models.tokenizer import fps_numpy, group_numpy, group_torch

SPLATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "splats"
GROUPS, SIZE, POINTS = 512, 32, 10_000


def anchor(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fpsample + cKDTree as their docs show them, then the same patch gather as ours."""
    xyz = np.ascontiguousarray(points[:, :3], dtype=np.float32)
    centres = xyz[fpsample.bucket_fps_kdline_sampling(xyz, GROUPS, h=7, start_idx=0)]
    _, nbr = cKDTree(xyz).query(centres, k=SIZE)
    patches = points[nbr]
    patches[..., SLICES["xyz"]] -= centres[:, None, :]
    return patches, centres


def median_ms(fn, objects, repeats: int) -> float:
    for o in objects:  # warm-up
        fn(o)
    times = []
    for _ in range(repeats):
        for o in objects:
            t0 = time.perf_counter()
            fn(o)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16, help="objects per group_torch call")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    files = sorted(SPLATS.glob("*/*_10k.splat"))
    objects = [resample(read_gaussians(f.read_bytes(), str(f)).activated(), POINTS, rng)
               for f in files]
    print(f"{len(objects)} objects of {POINTS} gaussians -> {GROUPS} patches of {SIZE}, "
          f"median of {args.repeats} x {len(objects)} calls, {torch.get_num_threads()} threads")

    # both interleaved twice, so a neighbour's load on the shared CPU hits both alike
    ours, base = [], []
    for _ in range(2):
        ours.append(median_ms(lambda o: group_numpy(o, GROUPS, SIZE), objects, args.repeats))
        base.append(median_ms(anchor, objects, args.repeats))
    o, b = min(ours), min(base)
    print(f"CPU per object: ours {o:.2f} ms, anchor (fpsample h=7 + cKDTree) {b:.2f} ms, "
          f"ratio ours/anchor {o / b:.2f} ({'no slower' if o <= b else 'SLOWER'})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = [objects[i % len(objects)] for i in range(args.batch)]
    pts = torch.from_numpy(np.stack(batch)).to(device)
    starts = torch.tensor([int(fps_numpy(p[:, :3], GROUPS)[0]) for p in batch], device=device)

    def run() -> None:
        group_torch(pts, GROUPS, SIZE, start=starts)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(max(3, args.repeats // 5)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    per_s = args.batch / statistics.median(times)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no GPU here)"
    print(f"batched torch path (group_torch, batch {args.batch}) on {name}: "
          f"{per_s:.1f} objects/s ({1e3 / per_s:.1f} ms per object); CPU path: "
          f"{1e3 / o:.0f} objects/s per worker")


if __name__ == "__main__":
    main()
