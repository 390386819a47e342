"""The renderer's compositing in float64 (since stop 32) against the named anchor, the same
render with the running sum of log(1 - alpha) in float32 (the renderer before): how far the
anchor's views are off, and what float64 costs.

Views of the shared donut and the 12 shared 10k-gaussian .splat objects at 64 px (the offline
teacher's) and 224 px (CLIP's), one ring camera each; and the ModelNet10 benchmark cache's own
views (every 45th test shape, 1024 gaussians, 3 cameras, 64 px, max_radius 2). For each: the
largest difference in levels of 255, the share of pixels whose uint8 value differs and the
most fragments composited in one view (the length of the running sum). Then
the time of a view, float64 / float32, medians of alternating rounds on one thread (as ingest
renders).

    .venv/bin/python -m benchmarks.compositing [--rounds 9] [--modelnet-every 45]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import clipgs.data.views as views_module
from clipgs.data.formats import load_gaussians
from clipgs.data.gaussians import resample
from clipgs.data.sources import voxels_to_gaussians
from clipgs.data.views import render, ring_cameras, single_thread

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@contextlib.contextmanager
def counting_fragments(counts: list[int]):
    """Record how many fragments each render composites (render calls views.composite)."""
    composite = views_module.composite

    def counted(pix, *args, **kw):
        counts.append(len(pix))
        return composite(pix, *args, **kw)

    views_module.composite = counted
    try:
        yield
    finally:
        views_module.composite = composite


def views(points, camera, size, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(float64 view, float32 view) as uint8."""
    return tuple((render(points, camera, size, accumulate=dt, **kw) * 255).round().byte()
                 .numpy().astype(int) for dt in (torch.float64, torch.float32))


def error_row(name: str, make_pairs) -> None:
    counts: list[int] = []
    with counting_fragments(counts):
        pairs = make_pairs()
    worst = max(int(np.abs(a - b).max()) for a, b in pairs)
    off = sum(int((a != b).any(-1).sum()) for a, b in pairs)
    total = sum(a.shape[0] * a.shape[1] for a, _ in pairs)
    print(f"{name:<34} {worst:>5}/255 {100 * off / total:>9.1f}% {max(counts) / 1e6:>10.2f}M")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--modelnet-every", type=int, default=45)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    donut = load_gaussians(SHARED / "gaussians" / "donut.ply").activated()  # 45.6k gaussians
    splats = [load_gaussians(f).activated()
              for f in sorted((SHARED / "splats").glob("*/*_10k.splat"))]
    camera = ring_cameras(4)[0]
    print(f"{'views: float32 against float64':<34} {'worst':>9} {'px differ':>10} "
          f"{'fragments':>11}")
    with single_thread():
        for size in (64, 224):
            error_row(f"donut, {size} px", lambda: [views(donut, camera, size)])
            error_row(f"{len(splats)} .splat objects, {size} px",
                      lambda: [views(s, camera, size) for s in splats])
        data = np.load(SHARED / "shapes" / "modelnet10.npz", allow_pickle=False)
        grids = data["X_test"][::args.modelnet_every]
        error_row(f"ModelNet10 cache, {len(grids)} shapes", lambda: [
            views(resample(voxels_to_gaussians(g).activated(), 1024, rng), r, 64, max_radius=2)
            for g in grids for r in ring_cameras(3)])

        print(f"\n{'time of a view (one thread)':<34} {'float64':>9} {'float32':>9} {'ratio':>7}")
        for name, pts, size in (("bob 10k, 64 px", splats[1], 64),
                                ("bob 10k, 224 px", splats[1], 224),
                                ("donut, 224 px", donut, 224)):
            times = {torch.float64: [], torch.float32: []}
            for _ in range(args.rounds):
                for dt in times:  # alternating: the machine's drift hits both alike
                    t = time.perf_counter()
                    render(pts, camera, size, accumulate=dt)
                    times[dt].append(time.perf_counter() - t)
            a, b = (statistics.median(times[dt]) * 1e3 for dt in times)
            print(f"{name:<34} {a:>7.1f}ms {b:>7.1f}ms {a / b:>6.2f}x")


if __name__ == "__main__":
    main()
